package glancemirror

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the mirror's Prometheus metrics (Config.Registerer).
type metrics struct {
	requests *prometheus.CounterVec
	auth     *prometheus.HistogramVec
}

func newMetrics(r prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hoard_glance_mirror_requests_total",
			Help: "Glance mirror requests by kind (download: GET .../file; proxy: passed to Glance) and result (the HTTP status sent, or aborted: a download cut short).",
		}, []string{"kind", "code"}),
		auth: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hoard_glance_mirror_authorize_seconds",
			Help:    "Time Glance took to authorize a download (GET /v2/images/{id} with the caller's headers), by result (allowed, refused, unreachable).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
		}, []string{"result"}),
	}
	if r == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.requests, m.auth} {
		if err := r.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				continue
			}
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) authorized(result string, start time.Time) {
	m.auth.WithLabelValues(result).Observe(time.Since(start).Seconds())
}

// statusWriter records the status a handler sent.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the connection (write
// deadlines).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush lets a proxied answer stream.
func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// count counts a request of kind; a panic (http.ErrAbortHandler: a download
// cut short) is counted as aborted and goes on.
func (m *metrics) count(kind string, w *statusWriter) {
	if r := recover(); r != nil {
		m.requests.WithLabelValues(kind, "aborted").Inc()
		panic(r)
	}
	code := w.code
	if code == 0 {
		code = http.StatusOK
	}
	m.requests.WithLabelValues(kind, strconv.Itoa(code)).Inc()
}
