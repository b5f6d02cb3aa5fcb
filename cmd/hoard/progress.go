package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

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
	unit     string // "bytes" or "chunks"
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

// Update is called with the amount done and the total (0 when unknown).
func (p *progress) Update(done, total int64) {
	now := time.Now()
	interval := 5 * time.Second
	if p.tty {
		interval = 100 * time.Millisecond
	}
	if now.Sub(p.last) < interval && done != total {
		return
	}
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
	if p.tty {
		bar := ""
		if total > 0 {
			const width = 30
			n := int(float64(width) * float64(done) / float64(total))
			n = min(n, width)
			bar = "[" + strings.Repeat("=", n) + strings.Repeat(" ", width-n) + "] "
		}
		fmt.Fprintf(p.w, "\r%s %s%s / %s  %s%s\x1b[K", p.label, bar, p.fmtN(done), p.fmtN(total), rateS, eta)
		return
	}
	pct := ""
	if total > 0 {
		pct = fmt.Sprintf(" (%.0f%%)", 100*float64(done)/float64(total))
	}
	fmt.Fprintf(p.w, "%s: %s of %s%s, %s%s\n", p.label, p.fmtN(done), p.fmtN(total), pct, rateS, eta)
}

// Done ends the progress line.
func (p *progress) Done() {
	if p.tty && !p.finished {
		fmt.Fprintln(p.w)
	}
	p.finished = true
}
