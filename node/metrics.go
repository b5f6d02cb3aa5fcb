package node

import (
	"sync/atomic"

	"github.com/hoardvm/hoard/node/api"
	"github.com/prometheus/client_golang/prometheus"
)

type stats struct {
	readBytes    [3]atomic.Int64 // local, peer, origin
	readChunks   [3]atomic.Int64
	zeroBytes    atomic.Int64
	originBytes  atomic.Int64
	originErrors atomic.Int64
	readahead    atomic.Int64
	profile      atomic.Int64
	hoard        atomic.Int64
	exportsOpen  atomic.Int64

	designatedFallbacks atomic.Int64

	// mirrorBytes: bytes the Glance mirror served, by mirrorSources.
	mirrorBytes [len(mirrorSources)]atomic.Int64
}

func slot(from int) int {
	switch from {
	case fromPeer:
		return 1
	case fromOrigin:
		return 2
	}
	return 0
}

func (s *stats) read(from int, n int) {
	s.readBytes[slot(from)].Add(int64(n))
	s.readChunks[slot(from)].Add(1)
}

func (s *stats) snapshot() api.Counters {
	c := api.Counters{ReadBytes: map[string]int64{}, ReadChunks: map[string]int64{}, PrefetchChunks: map[string]int64{}}
	for i, name := range []string{"local", "peer", "origin"} {
		c.ReadBytes[name] = s.readBytes[i].Load()
		c.ReadChunks[name] = s.readChunks[i].Load()
	}
	c.ZeroBytes = s.zeroBytes.Load()
	c.OriginBytes = s.originBytes.Load()
	c.OriginErrors = s.originErrors.Load()
	c.PrefetchChunks["readahead"] = s.readahead.Load()
	c.PrefetchChunks["profile"] = s.profile.Load()
	c.PrefetchChunks["hoard"] = s.hoard.Load()
	c.ExportsOpen = s.exportsOpen.Load()
	c.DesignatedFallbacks = s.designatedFallbacks.Load()
	return c
}

type metrics struct {
	collectors   []prometheus.Collector
	fetchSeconds *prometheus.HistogramVec
	fetchErrors  *prometheus.CounterVec
}

func newMetrics(n *Node) *metrics {
	s := &n.stats
	m := &metrics{
		fetchSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hoard_fetch_seconds",
			Help:    "Time to fetch one missing chunk, by source.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"source"}),
		fetchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hoard_fetch_errors_total",
			Help: "Chunk fetches that failed, by source.",
		}, []string{"source"}),
	}
	m.collectors = append(m.collectors, m.fetchSeconds, m.fetchErrors)
	counter := func(name, help string, labels prometheus.Labels, v *atomic.Int64) {
		m.collectors = append(m.collectors, prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: name, Help: help, ConstLabels: labels}, func() float64 { return float64(v.Load()) }))
	}
	for i, src := range []string{"local", "peer", "origin"} {
		counter("hoard_read_bytes_total", "Bytes of data chunks served to NBD readers, by where the chunk came from.",
			prometheus.Labels{"source": src}, &s.readBytes[i])
		counter("hoard_read_chunks_total", "Chunk reads served to NBD readers, by where the chunk came from.",
			prometheus.Labels{"source": src}, &s.readChunks[i])
	}
	counter("hoard_designated_fallbacks_total", "Chunks whose designated fetcher (another peer) did not deliver in time, so this node went to the origin.",
		nil, &s.designatedFallbacks)
	for i, src := range mirrorSources {
		counter("hoard_glance_mirror_served_bytes_total", "Bytes the Glance mirror served to its clients, by where they came from (local, peer, origin: the read path; zero: holes; glance_stream: streamed from Glance while registering the image).",
			prometheus.Labels{"source": src}, &s.mirrorBytes[i])
	}
	counter("hoard_read_zero_bytes_total", "Bytes of holes (zero runs) served.", nil, &s.zeroBytes)
	counter("hoard_origin_bytes_total", "Bytes fetched from origins, for reads and prefetches.", nil, &s.originBytes)
	counter("hoard_prefetch_chunks_total", "Chunks fetched into the store in the background, by reason.",
		prometheus.Labels{"reason": "readahead"}, &s.readahead)
	counter("hoard_prefetch_chunks_total", "Chunks fetched into the store in the background, by reason.",
		prometheus.Labels{"reason": "profile"}, &s.profile)
	m.collectors = append(m.collectors,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_exports_open", Help: "NBD exports open now."},
			func() float64 { return float64(s.exportsOpen.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_store_stored_bytes", Help: "Bytes of chunk payloads on disk (compressed)."},
			func() float64 { return float64(n.usage().StoredBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_store_raw_bytes", Help: "Uncompressed bytes of the stored chunks."},
			func() float64 { return float64(n.usage().RawBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_store_chunks", Help: "Chunks in the store."},
			func() float64 { return float64(n.usage().Chunks) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_store_quota_bytes", Help: "Chunk store quota (0: unlimited)."},
			func() float64 { return float64(n.cfg.StoreQuota) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_hot_bytes", Help: "Bytes of decoded chunks in the hot tier."},
			func() float64 { return float64(n.hotStats().Bytes) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "hoard_hot_reads_total", Help: "Chunk reads served by the hot tier."},
			func() float64 { return float64(n.hotStats().Hits) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "hoard_hot_corrupt_total", Help: "Hot tier entries that failed their CRC-32C and were served from the store."},
			func() float64 { return float64(n.hotStats().Corrupt) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "hoard_hot_evictions_total", Help: "Images evicted from the hot tier."},
			func() float64 { return float64(n.hotStats().Evictions) }),
	)
	return m
}

func (m *metrics) register(r prometheus.Registerer) error {
	for _, c := range m.collectors {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}
