package p2p

import (
	"fmt"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	reg      prometheus.Registerer
	cs       []prometheus.Collector
	served   prometheus.Counter
	received prometheus.Counter
	badPeers prometheus.Counter
	latency  *prometheus.HistogramVec

	catalogMsgs        *prometheus.CounterVec
	catalogDropped     prometheus.Counter
	catalogSyncs       *prometheus.CounterVec
	catalogSyncEntries prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, p *Peer) *metrics {
	m := &metrics{
		reg: reg,
		served: prometheus.NewCounter(prometheus.CounterOpts{Name: "hoard_p2p_served_bytes_total",
			Help: "Chunk payload bytes (as stored, compressed) sent to peers."}),
		received: prometheus.NewCounter(prometheus.CounterOpts{Name: "hoard_p2p_received_bytes_total",
			Help: "Chunk payload bytes (as stored, compressed) received from peers and verified."}),
		badPeers: prometheus.NewCounter(prometheus.CounterOpts{Name: "hoard_p2p_bad_peer_events_total",
			Help: "Times a peer sent bytes that failed verification."}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "hoard_p2p_request_seconds",
			Help:    "Chunk-protocol request latency, from send to the last reply, by request type.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"type"}),
		catalogMsgs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hoard_p2p_catalog_messages_total",
			Help: "Catalog and profile pubsub messages from peers, by kind (catalog, profile) and result (accepted, rejected, ignored: the author was reported bad)."},
			[]string{"kind", "result"}),
		catalogDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "hoard_p2p_catalog_dropped_total",
			Help: "Accepted catalog and profile messages dropped because the backend's learn queue was full."}),
		catalogSyncs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "hoard_p2p_catalog_syncs_total",
			Help: "Catalog syncs this node asked of peers, by result (ok, error)."}, []string{"result"}),
		catalogSyncEntries: prometheus.NewCounter(prometheus.CounterOpts{Name: "hoard_p2p_catalog_sync_entries_total",
			Help: "Catalog and profile entries received by sync."}),
	}
	peers := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hoard_p2p_peers",
		Help: "Peers this node is connected to."},
		func() float64 { return float64(len(p.host.Network().Peers())) })
	m.cs = []prometheus.Collector{m.served, m.received, m.badPeers, m.latency, peers,
		m.catalogMsgs, m.catalogDropped, m.catalogSyncs, m.catalogSyncEntries}
	if reg != nil {
		for _, c := range m.cs {
			reg.MustRegister(c)
		}
	}
	return m
}

func (m *metrics) unregister() {
	if m.reg == nil {
		return
	}
	for _, c := range m.cs {
		m.reg.Unregister(c)
	}
}

// zstdDec decodes zstd payloads of chunks received from peers.
var zstdDec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(chunkstore.MaxChunkSize))

// verifyStored decodes st and checks it against id: the default verifier.
func verifyStored(id chunkstore.ID, st chunkstore.Stored) ([]byte, error) {
	if st.RawLen < 0 || st.RawLen > chunkstore.MaxChunkSize {
		return nil, fmt.Errorf("chunk length %d out of range", st.RawLen)
	}
	var raw []byte
	switch st.Codec {
	case chunkstore.CodecRaw:
		if len(st.Payload) != st.RawLen {
			return nil, fmt.Errorf("raw payload %d bytes, want %d", len(st.Payload), st.RawLen)
		}
		raw = st.Payload
	case chunkstore.CodecS2:
		n, err := s2.DecodedLen(st.Payload)
		if err != nil || n != st.RawLen {
			return nil, fmt.Errorf("s2 payload decodes to %d bytes, want %d (%v)", n, st.RawLen, err)
		}
		if raw, err = s2.Decode(make([]byte, st.RawLen), st.Payload); err != nil {
			return nil, err
		}
	case chunkstore.CodecZstd:
		out, err := zstdDec.DecodeAll(st.Payload, make([]byte, 0, st.RawLen))
		if err != nil {
			return nil, err
		}
		if len(out) != st.RawLen {
			return nil, fmt.Errorf("decompressed %d bytes, want %d", len(out), st.RawLen)
		}
		raw = out
	default:
		return nil, fmt.Errorf("unknown codec %d", st.Codec)
	}
	if !id.Verify(raw) {
		return nil, chunkstore.ErrMismatch
	}
	return raw, nil
}
