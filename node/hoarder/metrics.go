package hoarder

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the hoarder's Prometheus series.
type metrics struct {
	bytes    *prometheus.CounterVec
	failures prometheus.Counter
	ws       *prometheus.GaugeVec
	local    *prometheus.GaugeVec
	budget   prometheus.Gauge

	mu     sync.Mutex
	labels map[string]bool // manifests with series now
}

func newMetrics(r prometheus.Registerer, budget int64) (*metrics, error) {
	m := &metrics{
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hoard_hoard_bytes_total",
			Help: "Raw bytes the hoarder fetched ahead of boots, by where they came from (local: already there).",
		}, []string{"source"}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hoard_hoard_failures_total",
			Help: "Hoarder fetches that failed (tried again at the next pass).",
		}),
		ws: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hoard_working_set_bytes",
			Help: "Raw bytes of each known image's boot working set.",
		}, []string{"manifest"}),
		local: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hoard_working_set_local_bytes",
			Help: "Raw bytes of each known image's boot working set held locally.",
		}, []string{"manifest"}),
		budget: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hoard_hoard_budget_bytes",
			Help: "The hoard budget in stored bytes (hoard.budget; 0: hoarding off).",
		}),
		labels: map[string]bool{},
	}
	for _, src := range []string{SourceLocal, SourcePeer, SourceOrigin} {
		m.bytes.WithLabelValues(src) // every source shows, at 0
	}
	m.budget.Set(float64(budget))
	for _, c := range []prometheus.Collector{m.bytes, m.failures, m.ws, m.local, m.budget} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// setImages publishes the working sets of a plan and deletes the series of
// images no longer in it, so the label set stays the current images.
func (m *metrics) setImages(images []ImageStatus) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := make(map[string]bool, len(images))
	for _, img := range images {
		k := img.Manifest.String()
		now[k] = true
		m.ws.WithLabelValues(k).Set(float64(img.WorkingSetBytes))
		m.local.WithLabelValues(k).Set(float64(img.LocalBytes))
	}
	for k := range m.labels {
		if !now[k] {
			m.ws.DeleteLabelValues(k)
			m.local.DeleteLabelValues(k)
		}
	}
	m.labels = now
}
