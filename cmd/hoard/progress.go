package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hoardvm/hoard/node/api"
	"golang.org/x/term"
)

// progress renders a bar (bytes, rate, ETA) on a terminal, and a line every few
// seconds otherwise, so a long operation always shows it is alive.
type progress struct {
	w        io.Writer
	tty      bool
	label    string
	start    time.Time
	last     time.Time
	unit     string // "bytes", "chunks", or "" (no count: only alive)
	complete bool   // the line for done == total was printed
	finished bool
}

func newProgress(label, unit string) *progress {
	return &progress{w: os.Stderr, tty: term.IsTerminal(int(os.Stderr.Fd())), label: label, unit: unit, start: time.Now()}
}

func (p *progress) fmtN(n int64) string {
	if p.unit == "bytes" {
		return formatSize(n)
	}
	return fmt.Sprintf("%d %s", n, p.unit)
}

// interval is how often a line is printed: often on a terminal (the line is
// redrawn), every few seconds otherwise (each is a new line of a log).
func (p *progress) interval() time.Duration {
	if p.tty {
		return 100 * time.Millisecond
	}
	return 5 * time.Second
}

// Report renders progress a daemon streamed (api.Client's callbacks).
func (p *progress) Report(pr api.Progress) {
	if pr.Unit == "" {
		p.alive()
		return
	}
	p.unit = pr.Unit
	p.Update(pr.Done, pr.Total)
}

// alive says the operation still runs, when there is nothing to count.
func (p *progress) alive() {
	now := time.Now()
	if now.Sub(p.start) < 2*time.Second || now.Sub(p.last) < p.interval() {
		return // a quick operation needs no sign of life
	}
	p.last = now
	el := now.Sub(p.start).Round(time.Second)
	if p.tty {
		fmt.Fprintf(p.w, "\r%s: working, %s\x1b[K", p.label, el)
		return
	}
	fmt.Fprintf(p.w, "%s: working, %s\n", p.label, el)
}

// Update is called with the amount done and the total (0 when unknown).
func (p *progress) Update(done, total int64) {
	if done == 0 && total <= 0 {
		return // starting: nothing to show yet
	}
	now := time.Now()
	end := total > 0 && done >= total
	switch {
	case end && p.complete:
		return // said once; what remains (committing) is not counted
	case !end && now.Sub(p.last) < p.interval():
		return
	}
	p.complete = end
	p.last = now
	el := now.Sub(p.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(done) / el
	}
	eta := ""
	if total > 0 && rate > 0 && done < total {
		eta = fmt.Sprintf(" ETA %s", (time.Duration(float64(total-done)/rate) * time.Second).Round(time.Second))
	}
	rateS := p.fmtN(int64(rate)) + "/s"
	of := p.fmtN(total)
	if total <= 0 {
		of = "?"
	}
	if p.tty {
		bar := ""
		if total > 0 {
			const width = 30
			n := int(float64(width) * float64(done) / float64(total))
			n = min(n, width)
			bar = "[" + strings.Repeat("=", n) + strings.Repeat(" ", width-n) + "] "
		}
		fmt.Fprintf(p.w, "\r%s %s%s / %s  %s%s\x1b[K", p.label, bar, p.fmtN(done), of, rateS, eta)
		return
	}
	pct := ""
	if total > 0 {
		pct = fmt.Sprintf(" (%.0f%%)", 100*float64(done)/float64(total))
	}
	fmt.Fprintf(p.w, "%s: %s of %s%s, %s%s\n", p.label, p.fmtN(done), of, pct, rateS, eta)
}

// Done ends the progress line.
func (p *progress) Done() {
	if p.tty && !p.finished && !p.last.IsZero() {
		fmt.Fprintln(p.w)
	}
	p.finished = true
}
