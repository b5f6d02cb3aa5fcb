package planner

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
)

// smallTrace is a trace small enough for the race detector that still has
// storms, failures and joins, and stores under pressure.
func smallTrace(seed uint64) ClusterTrace {
	cfg := DefaultTraceGen(seed)
	cfg.Nodes, cfg.Slots, cfg.Images = 24, 8, 40
	cfg.Duration, cfg.Starts, cfg.Storms, cfg.StormSize = 3600, 300, 3, 40
	cfg.Failures, cfg.Joins, cfg.RejoinAfter = 3, 2, 600
	cfg.Lifetime, cfg.StormLifetime = 1200, 600
	return GenerateTrace(cfg)
}

func smallConfig(policy, placement string) ClusterSimConfig {
	cfg := DefaultClusterSimConfig(policy, placement)
	cfg.Quota = 1 << 30
	cfg.HoardInterval = 120
	return cfg
}

// TestClusterSimInvariants plays a trace under every policy and placement
// and checks after every event: no node's store holds more than its quota;
// every running VM's working set is pinned on its node, and no chunk of it
// held at the previous event was evicted since (live chunks never are); the
// hoard's pinned chunks held stay within the hoard budget; the holder
// counts the peer lookups use match the stores; and no policy named a
// victim the store refused.
func TestClusterSimInvariants(t *testing.T) {
	t.Parallel()
	tr := smallTrace(3)
	images := tr.Images()
	for _, pl := range []string{PlacementRandom, PlacementCache} {
		for _, p := range ClusterPolicies() {
			t.Run(p+"/"+pl, func(t *testing.T) {
				t.Parallel()
				cfg := smallConfig(p, pl)
				type key struct {
					vm int
					id chunkstore.ID
				}
				prev := map[key]bool{}
				var events, evictions, fails int
				var holders map[chunkstore.ID]int
				cfg.check = func(now float64, nodes []*simNode, vms []*simVM) {
					events++
					if p == PolicyNone {
						return
					}
					cur := map[key]bool{}
					for i, vm := range vms {
						if !vm.alive {
							continue
						}
						n := nodes[vm.node]
						if !n.up {
							t.Fatalf("t=%v: VM %d runs on node %d, which is down", now, i, vm.node)
						}
						for _, c := range images[vm.image].WorkingSet {
							if !n.cache.Pinned(c.ID) {
								t.Fatalf("t=%v: chunk of running VM %d not pinned on node %d", now, i, vm.node)
							}
							if n.cache.Has(c.ID) {
								cur[key{i, c.ID}] = true
							} else if prev[key{i, c.ID}] {
								t.Fatalf("t=%v: live chunk of VM %d evicted from node %d", now, i, vm.node)
							}
						}
					}
					prev = cur
					holders = map[chunkstore.ID]int{}
					for i, n := range nodes {
						if !n.up {
							continue
						}
						if n.cache.Used() > n.cache.Quota() {
							t.Fatalf("t=%v: node %d holds %d bytes, over its quota %d", now, i, n.cache.Used(), n.cache.Quota())
						}
						var hoarded int64
						for _, id := range n.hoardPins {
							if n.cache.Has(id) {
								hoarded += tr.Header.ChunkSize
							}
						}
						if hoarded > cfg.Quota/2 {
							t.Fatalf("t=%v: node %d hoards %d bytes, over its budget %d", now, i, hoarded, cfg.Quota/2)
						}
						st := n.cache.Stats()
						if st.BadVictims != 0 {
							t.Fatalf("t=%v: node %d: %d bad victims", now, i, st.BadVictims)
						}
						evictions += int(st.Evictions)
						if events%50 == 0 {
							for id := range n.held {
								if !n.cache.Has(id) {
									t.Fatalf("t=%v: node %d's mirror holds a chunk its store does not", now, i)
								}
								holders[id]++
							}
						}
					}
				}
				sim := func() ClusterSimResult {
					r, err := SimulateCluster(tr, cfg)
					if err != nil {
						t.Fatal(err)
					}
					return r
				}
				r := sim()
				for _, ev := range tr.Events {
					if ev.Type == TraceFail {
						fails++
					}
				}
				if events != len(tr.Events) || fails == 0 {
					t.Fatalf("checked %d of %d events, %d failures", events, len(tr.Events), fails)
				}
				if p != PolicyNone && evictions == 0 {
					t.Fatalf("no eviction: the trace does not test eviction")
				}
				if r.Starts < len(tr.Events)/2 || r.HitRatio < 0 || r.HitRatio > 1 || r.Imbalance < 1 || r.P99Start < r.MeanStart {
					t.Fatalf("result %+v", r)
				}
			})
		}
	}
}

// TestClusterSimDeterministic: the same trace and seed give the same
// results; another seed another trace and results.
func TestClusterSimDeterministic(t *testing.T) {
	t.Parallel()
	run := func(seed uint64) []byte {
		cfg := DefaultTraceGen(seed)
		cfg.Nodes, cfg.Slots, cfg.Images = 12, 8, 20
		cfg.Duration, cfg.Starts, cfg.Storms, cfg.StormSize = 1800, 120, 2, 20
		cfg.Failures, cfg.Joins, cfg.RejoinAfter, cfg.Lifetime, cfg.StormLifetime = 2, 1, 300, 900, 300
		tr := GenerateTrace(cfg)
		var out bytes.Buffer
		for _, pl := range []string{PlacementRandom, PlacementCache} {
			for _, p := range ClusterPolicies() {
				cfg := smallConfig(p, pl)
				cfg.Seed = seed
				r, err := SimulateCluster(tr, cfg)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := json.Marshal(r)
				out.Write(append(b, '\n'))
			}
		}
		return out.Bytes()
	}
	a, b, c := run(5), run(5), run(6)
	if !bytes.Equal(a, b) {
		t.Fatalf("same seed, different results:\n%s\n%s", a, b)
	}
	if bytes.Equal(a, c) {
		t.Fatal("another seed gave the same results")
	}
	if !reflect.DeepEqual(GenerateTrace(DefaultTraceGen(9)), GenerateTrace(DefaultTraceGen(9))) {
		t.Fatal("same seed, different traces")
	}
}

// TestClusterSimCompares checks what the model must show whatever its
// numbers: no cache reads every working set from the origin and hits
// nothing; caching policies read less from the origin and start faster;
// cache-aware placement hits more than random; hoarding hits more than its
// eviction policy alone.
func TestClusterSimCompares(t *testing.T) {
	t.Parallel()
	tr := smallTrace(4)
	res := map[string]ClusterSimResult{}
	for _, pl := range []string{PlacementRandom, PlacementCache} {
		for _, p := range ClusterPolicies() {
			r, err := SimulateCluster(tr, smallConfig(p, pl))
			if err != nil {
				t.Fatal(err)
			}
			res[p+"/"+pl] = r
		}
	}
	none := res["none/random"]
	if none.HitRatio != 0 || none.PeerBytes != 0 || none.OriginBytes == 0 {
		t.Fatalf("none %+v", none)
	}
	for _, p := range ClusterPolicies()[1:] {
		r, c := res[p+"/random"], res[p+"/cache-aware"]
		if r.OriginBytes >= none.OriginBytes || r.MeanStart >= none.MeanStart || r.HitRatio <= 0 {
			t.Errorf("%s random %+v against none %+v", p, r, none)
		}
		if c.HitRatio <= r.HitRatio {
			t.Errorf("%s: cache-aware hit ratio %.3f, random %.3f", p, c.HitRatio, r.HitRatio)
		}
	}
	for _, pl := range []string{PlacementRandom, PlacementCache} {
		if h, s := res["hoard/"+pl], res["sharing/"+pl]; h.HitRatio <= s.HitRatio || h.HoardPeerBytes+h.HoardOriginBytes == 0 {
			t.Errorf("%s: hoard %+v against sharing %+v", pl, h, s)
		}
	}
}

func TestReadTraceErrors(t *testing.T) {
	t.Parallel()
	header := `{"hoard_trace": 1, "nodes": 2, "images": [{"family": "ubuntu", "size": 1073741824}]}`
	for _, tc := range []struct {
		name, trace, want string
	}{
		{"empty", "", "trace is empty"},
		{"bad header", `{"nodes": 2}`, "line 1: header"},
		{"no images", `{"hoard_trace": 1, "nodes": 2, "images": []}`, "line 1: header: images is empty"},
		{"no family", `{"hoard_trace": 1, "nodes": 2, "images": [{"size": 10}]}`, "line 1: header: image 0 has no family"},
		{"not JSON", header + "\n{\"t\": 1, \"type\": \"start\"}\nnot json\n", "line 3:"},
		{"unknown field", header + "\n\n{\"t\": 1, \"type\": \"start\", \"img\": 0}\n", "line 3:"},
		{"image out of range", header + "\n{\"t\": 1, \"type\": \"start\", \"image\": 1}\n", "line 2: image 1 out of range"},
		{"bad type", header + "\n{\"t\": 1, \"type\": \"stop\"}\n", "line 2: type \"stop\" unknown"},
		{"negative time", header + "\n{\"t\": -1, \"type\": \"fail\", \"node\": 0}\n", "line 2: t is -1"},
		{"bad node", header + "\n{\"t\": 1, \"type\": \"join\", \"node\": 70000}\n", "line 2: node 70000 out of range"},
		{"two values", header + "\n{\"t\": 1, \"type\": \"join\"} {}\n", "line 2:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ReadTrace(strings.NewReader(tc.trace))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	tr, err := ReadTrace(strings.NewReader(header + "\n{\"t\": 5, \"type\": \"start\"}\n{\"t\": 2, \"type\": \"fail\", \"node\": 1}\n"))
	if err != nil || len(tr.Events) != 2 || tr.Events[0].Type != TraceFail {
		t.Fatalf("trace %+v, %v: want two events sorted by time", tr, err)
	}
}

func TestTraceRoundTrip(t *testing.T) {
	t.Parallel()
	tr := smallTrace(2)
	var b bytes.Buffer
	if err := WriteTrace(&b, tr); err != nil {
		t.Fatal(err)
	}
	got, err := ReadTrace(&b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, tr) {
		t.Fatal("trace read back differs")
	}
	// Working sets overlap within a family, not across.
	imgs := tr.Images()
	fam := map[string][]int{}
	for i, h := range tr.Header.Images {
		fam[h.Family] = append(fam[h.Family], i)
	}
	overlap := func(a, b Image) int {
		m := map[chunkstore.ID]bool{}
		for _, c := range a.WorkingSet {
			m[c.ID] = true
		}
		n := 0
		for _, c := range b.WorkingSet {
			if m[c.ID] {
				n++
			}
		}
		return n
	}
	u := fam["ubuntu"]
	if len(u) < 2 || overlap(imgs[u[0]], imgs[u[1]]) == 0 {
		t.Fatalf("ubuntu images %v share no working-set chunk", u)
	}
	for f, is := range fam {
		if f != "ubuntu" && overlap(imgs[u[0]], imgs[is[0]]) != 0 {
			t.Fatalf("ubuntu and %s share working-set chunks", f)
		}
	}
}
