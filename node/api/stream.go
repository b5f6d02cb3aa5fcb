package api

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Streamed answers. A client that sends "Accept: application/x-ndjson" to a
// long route (POST /v1/images, /v1/images/{name}/pull, /v1/store/verify,
// /v1/store/gc) gets HTTP 200 at once and then one JSON object a line
// (StreamEvent): progress while the operation runs, repeated every few
// seconds even when nothing moved (so the client knows the daemon is at it),
// and last the result, or the error with the status a plain answer would
// have had. Other clients get the plain JSON answer when the operation ends.
// A client that goes away cancels the operation.

// DefaultProgressInterval is how often a streamed answer reports changed
// progress (Options.ProgressInterval); keepAliveInterval, how often it
// repeats unchanged progress.
const (
	DefaultProgressInterval = 250 * time.Millisecond
	keepAliveInterval       = 5 * time.Second
)

// wantsStream reports whether the client asked for a streamed answer.
func wantsStream(r *http.Request) bool {
	return strings.Contains(r.Header.Get("Accept"), MediaNDJSON)
}

// answer runs op and replies with its result: plainly, or streamed with
// progress when the client asked for it (see StreamEvent). op may call
// report from any goroutine; unit says what it counts ("" if it never
// calls it). op runs in a goroutine that answer waits for.
func answer(w http.ResponseWriter, r *http.Request, every time.Duration, phase, unit string, op func(ctx context.Context, report func(done, total int64)) (any, error)) {
	if !wantsStream(r) {
		v, err := op(r.Context(), func(int64, int64) {})
		reply(w, v, err)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	var mu sync.Mutex
	cur := Progress{Phase: phase, Unit: unit}
	seq := 0 // bumped by every report
	report := func(done, total int64) {
		mu.Lock()
		cur.Done, cur.Total = done, total
		seq++
		mu.Unlock()
	}
	snapshot := func() (Progress, int) {
		mu.Lock()
		defer mu.Unlock()
		return cur, seq
	}
	type outcome struct {
		v   any
		err error
	}
	res := make(chan outcome, 1)
	go func() {
		v, err := op(ctx, report)
		res <- outcome{v, err}
	}()

	w.Header().Set("Content-Type", MediaNDJSON)
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	send := func(ev StreamEvent) bool {
		return enc.Encode(ev) == nil && rc.Flush() == nil
	}
	p, lastSeq := snapshot()
	ok := send(StreamEvent{Progress: &p}) // at once: the client sees the daemon took it
	lastSent := time.Now()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for ok {
		select {
		case out := <-res:
			if p, s := snapshot(); s != lastSeq && !send(StreamEvent{Progress: &p}) {
				return
			}
			if out.err != nil {
				send(StreamEvent{Error: out.err.Error(), Status: StatusOf(out.err)})
				return
			}
			b, err := json.Marshal(out.v)
			if err != nil {
				send(StreamEvent{Error: "encode the result: " + err.Error(), Status: http.StatusInternalServerError})
				return
			}
			send(StreamEvent{Result: b})
			return
		case <-tick.C:
			p, s := snapshot()
			if s == lastSeq && time.Since(lastSent) < keepAliveInterval {
				continue
			}
			ok = send(StreamEvent{Progress: &p})
			lastSeq, lastSent = s, time.Now()
		}
	}
	// The client is gone: stop the operation and wait for it.
	cancel()
	<-res
}
