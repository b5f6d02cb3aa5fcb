package node_test

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/hoarder"
	"github.com/hoardvm/hoard/p2p"
)

// scaleBlock is the chunk size of the scale test's images: they are
// imported with fixed chunking, so a block is a chunk and two images that
// share a block share its chunk.
const scaleBlock = 64 << 10

// scaleShape is one run of TestHoardingScale.
type scaleShape struct {
	nodes    int
	families []int // images per OS family
	adders   int   // nodes 0..adders-1 add the images (lazily)
	small    int   // the last small nodes get a budget smaller than the union
	timeout  time.Duration
	sync     time.Duration // catalog sync interval
	interval time.Duration // hoard interval
}

// scaleCorpus is a set of images in OS families, and the blocks each boot
// reads.
type scaleCorpus struct {
	data [][]byte  // per image, 16 blocks
	boot [][]int64 // per image, the offsets its boot reads, in order
	ws   []int64   // per image, the raw bytes of its working set (distinct non-zero chunks)
	// union is the raw bytes of the distinct non-zero chunks of all the
	// working sets together: what the origin should send, once.
	union int64
	name  []string
}

// scaleBlockData is one 64 KiB block: half random (from key), half a
// repeated pattern, so that it compresses to about half, as disk images do.
func scaleBlockData(key ...byte) []byte {
	var seed [32]byte
	copy(seed[:], key)
	b := make([]byte, scaleBlock)
	rand.NewChaCha8(seed).Read(b[:scaleBlock/2])
	for i := scaleBlock / 2; i < scaleBlock; i++ {
		b[i] = byte(i % 251)
	}
	return b
}

// newScaleCorpus builds the images: 16 blocks each. Block 0 (the "boot
// loader") is the same in every image; in each family, blocks are the
// family's, but for two blocks of the boot's reads and one outside it that
// are the image's own; block 5 is zero in every image. Every image of a
// family boots the same way: it reads block 0, then 9 of the others and the
// zero block in a family-specific order, so the working sets of one family
// share 8 of 10 chunks, and all share block 0.
func newScaleCorpus(families []int) *scaleCorpus {
	const blocks = 16
	c := &scaleCorpus{}
	union := map[[32]byte]bool{}
	for f, n := range families {
		r := rand.New(rand.NewPCG(uint64(f), 99))
		order := r.Perm(blocks - 1) // blocks 1..15 in a family order
		bootBlocks := []int{0}
		for _, b := range order {
			if b+1 != 5 && len(bootBlocks) < 10 {
				bootBlocks = append(bootBlocks, b+1)
			}
		}
		bootBlocks = slices.Insert(bootBlocks, 4, 5) // a read of the zero block
		// The image's own blocks: two read at boot, one not.
		var own []int
		for _, b := range bootBlocks[1:] {
			if b != 5 && len(own) < 2 {
				own = append(own, b)
			}
		}
		for b := 1; b < blocks; b++ {
			if b != 5 && !slices.Contains(bootBlocks, b) {
				own = append(own, b)
				break
			}
		}
		for k := range n {
			img := make([]byte, 0, blocks*scaleBlock)
			for b := range blocks {
				switch {
				case b == 0:
					img = append(img, scaleBlockData(0xb0)...)
				case b == 5:
					img = append(img, make([]byte, scaleBlock)...)
				case slices.Contains(own, b):
					img = append(img, scaleBlockData(2, byte(f), byte(k), byte(b))...)
				default:
					img = append(img, scaleBlockData(1, byte(f), byte(b))...)
				}
			}
			var offs []int64
			seen := map[[32]byte]bool{}
			var ws int64
			for _, b := range bootBlocks {
				off := int64(b) * scaleBlock
				offs = append(offs, off)
				blk := img[off : off+scaleBlock]
				if b == 5 {
					continue
				}
				h := sha256.Sum256(blk)
				if !seen[h] {
					seen[h] = true
					ws += scaleBlock
				}
				union[h] = true
			}
			c.data = append(c.data, img)
			c.boot = append(c.boot, offs)
			c.ws = append(c.ws, ws)
			c.name = append(c.name, fmt.Sprintf("os%d-v%d", f, k))
		}
	}
	c.union = int64(len(union)) * scaleBlock
	return c
}

// TestHoardingScale (scatter hoarding, acceptance): images in OS families
// (images of one family share most of their working sets) are added lazily
// on a few nodes of a mocknet cluster and booted once each on some node.
// Every node then holds every working set (the union fits its budget), but
// for a few nodes whose budget is a third of the union, which hoard within
// it; the origin sends the union of the working sets about once. It logs the
// time to converge and each node's hoard traffic.
//
// It runs 20 nodes and 10 images; HOARD_SCALE=1 runs 100 nodes and 50
// images (minutes under -race on a small machine).
func TestHoardingScale(t *testing.T) {
	t.Parallel()
	sh := scaleShape{nodes: 20, families: []int{4, 3, 3}, adders: 3, small: 2,
		timeout: 90 * time.Second, sync: 2 * time.Second, interval: time.Second}
	if os.Getenv("HOARD_SCALE") == "1" {
		sh = scaleShape{nodes: 100, families: []int{10, 10, 10, 10, 10}, adders: 5, small: 5,
			timeout: 10 * time.Minute, sync: 3 * time.Second, interval: 2 * time.Second}
	}
	runHoardingScale(t, sh)
}

func runHoardingScale(t *testing.T, sh scaleShape) {
	c := newScaleCorpus(sh.families)
	images := len(c.data)
	bigBudget := 4 * c.union
	smallBudget := c.union / 3
	isSmall := func(i int) bool { return i >= sh.nodes-sh.small }

	srvs := make([]*rangeServer, images)
	for i := range images {
		srvs[i] = newRangeServer(t, c.data[i])
	}
	originBytes := func() int64 {
		var n int64
		for _, s := range srvs {
			n += s.bytes.Load()
		}
		return n
	}
	start := time.Now()
	cl := startMockCluster(t, sh.nodes, func(i int, cfg *node.Config) {
		cfg.P2P.Options = append(cfg.P2P.Options, p2p.WithCatalogSyncInterval(sh.sync))
		cfg.HoardInterval = sh.interval
		cfg.P2P.DesignatedTimeout = 30 * time.Second
		// A hundred nodes on two loaded cores: an in-process origin has
		// missed the default 30 s.
		cfg.OriginTimeout = 2 * time.Minute
		// A slow boot's last reads must still be in its profile (the
		// full run's boots once took 3 min, past the default 2 min).
		cfg.ProfileWindow = 15 * time.Minute
		cfg.HoardBudget = bigBudget
		if isSmall(i) {
			cfg.HoardBudget = smallBudget
		}
	})
	t.Logf("%d nodes up in %v", sh.nodes, time.Since(start).Round(time.Millisecond))

	start = time.Now()
	manifests := make([]chunkstore.ID, images)
	for i := range images {
		req := api.ImportRequest{Source: srvs[i].URL + "/" + c.name[i] + ".raw", Name: c.name[i], Lazy: true, Chunking: "fixed"}
		// Once more after an error: under load, a POST can race the
		// server closing the keep-alive connection it reuses (idle 30 s)
		// and meet a reset; the client does not retry a POST.
		res, err := cl[i%sh.adders].client.AddImage(t.Context(), req)
		if err != nil {
			t.Logf("add %s: %v; once more", c.name[i], err)
			res = addImage(t, cl[i%sh.adders], req)
		}
		manifests[i] = res.Manifest
	}
	imported := originBytes() // a lazy add reads the image once, to cut and hash it
	eventually(t, sh.timeout, func() bool {
		for _, tn := range cl {
			for _, nm := range c.name {
				if _, err := tn.Store().Resolve(t.Context(), nm); err != nil {
					return false
				}
			}
		}
		return true
	}, "every node to learn every image")
	t.Logf("%d images added on %d nodes, known on every node in %v", images, sh.adders, time.Since(start).Round(time.Millisecond))

	// The boots: image i on node adders+i (never a small-budget node), all
	// at once, each reading its boot blocks and checking them.
	start = time.Now()
	var wg sync.WaitGroup
	for i := range images {
		tn := cl[(sh.adders+i)%(sh.nodes-sh.small)]
		wg.Go(func() {
			x := openRetry(t, tn, c.name[i])
			defer x.Close()
			buf := make([]byte, scaleBlock)
			for _, off := range c.boot[i] {
				rs := time.Now()
				if err := x.ReadAt(t.Context(), buf, off); err != nil {
					t.Errorf("boot of %s: read at %d: %v", c.name[i], off, err)
					return
				}
				if d := time.Since(rs); d > time.Second {
					t.Logf("boot %s read %d took %v", c.name[i], off, d)
				}
				if !bytes.Equal(buf, c.data[i][off:off+scaleBlock]) {
					t.Errorf("boot of %s: wrong bytes at %d", c.name[i], off)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d boots in %v", images, time.Since(start).Round(time.Millisecond))

	// Convergence: every working set known with its full size, and local on
	// every node but the small ones, which hoard within their budget.
	wantWS := make(map[chunkstore.ID]int64, images)
	for i, m := range manifests {
		wantWS[m] = c.ws[i]
	}
	start = time.Now()
	converged := make([]time.Duration, sh.nodes)
	last := make([]hoarder.Status, sh.nodes)
	why := make([]string, sh.nodes)
	check := func(i int) bool {
		s, err := cl[i].Status(t.Context())
		if err != nil || s.Hoard == nil {
			why[i] = fmt.Sprintf("no hoarder status (%v)", err)
			return false
		}
		h := *s.Hoard
		last[i] = h
		if len(h.Images) != images {
			why[i] = fmt.Sprintf("%d images planned, want %d", len(h.Images), images)
			return false
		}
		var complete int
		for _, im := range h.Images {
			if want := wantWS[im.Manifest]; im.WorkingSetBytes != want {
				why[i] = fmt.Sprintf("image %s: working set of %d bytes, want %d (profile not learned yet)", im.Manifest, im.WorkingSetBytes, want)
				return false
			}
			if im.LocalBytes == im.WorkingSetBytes {
				complete++
			}
		}
		if h.HeldBytes+h.PlannedBytes > h.Budget {
			why[i] = fmt.Sprintf("plan of %d held + %d planned stored bytes over the budget of %d", h.HeldBytes, h.PlannedBytes, h.Budget)
			return false
		}
		if isSmall(i) {
			// The plan fetched all it planned, and fills the budget (to a chunk).
			if h.Done != h.Chunks || h.HeldBytes+h.PlannedBytes < h.Budget-scaleBlock {
				why[i] = fmt.Sprintf("small budget: %d of %d planned chunks done, %d held + %d planned of %d", h.Done, h.Chunks, h.HeldBytes, h.PlannedBytes, h.Budget)
				return false
			}
			return true
		}
		if complete != images {
			why[i] = fmt.Sprintf("%d of %d working sets local", complete, images)
			return false
		}
		return true
	}
	deadline := time.Now().Add(sh.timeout)
	lastLog := time.Now()
	for {
		left := 0
		for i := range cl {
			if converged[i] == 0 {
				if check(i) {
					converged[i] = time.Since(start)
				} else {
					left++
				}
			}
		}
		if left == 0 {
			break
		}
		if time.Since(lastLog) > 30*time.Second {
			lastLog = time.Now()
			for i := range cl {
				if converged[i] == 0 {
					t.Logf("after %v, %d nodes still hoarding; node %d: %s", time.Since(start).Round(time.Second), left, i, why[i])
					break
				}
			}
		}
		if time.Now().After(deadline) {
			for i := range cl {
				if converged[i] == 0 {
					t.Errorf("node %d did not converge in %v: %s (hoarded by source %v, failures %d, last error %q)",
						i, sh.timeout, why[i], last[i].BySource, last[i].Failures, last[i].LastError)
				}
			}
			t.FailNow()
		}
		time.Sleep(200 * time.Millisecond)
	}
	took := time.Since(start)
	got := originBytes() - imported

	// Which chunks the origin sent more than once, and whether through one
	// image's source or several (family chunks).
	sent := map[[32]byte][]int{} // chunk -> images whose source sent it, once per GET
	for i, srv := range srvs {
		srv.mu.Lock()
		for rg, n := range srv.ranges {
			var from, to int64
			if _, err := fmt.Sscanf(rg, "bytes=%d-%d", &from, &to); err != nil || to-from+1 != scaleBlock || from%scaleBlock != 0 {
				continue // the adds' reads
			}
			h := sha256.Sum256(c.data[i][from : from+scaleBlock])
			for range n {
				sent[h] = append(sent[h], i)
			}
		}
		srv.mu.Unlock()
	}
	var again, acrossImages int
	for _, imgs := range sent {
		if len(imgs) > 1 {
			again += len(imgs) - 1
			if slices.ContainsFunc(imgs, func(i int) bool { return i != imgs[0] }) {
				acrossImages++
			}
		}
	}
	t.Logf("origin: %d distinct chunks sent, %d extra sends (%d chunks sent through more than one image's source)", len(sent), again, acrossImages)

	// The report.
	var traffic, peerB, originB []int64
	var fallbacks int64
	for i, tn := range cl {
		h := last[i]
		traffic = append(traffic, h.BySource[hoarder.SourcePeer]+h.BySource[hoarder.SourceOrigin])
		peerB = append(peerB, h.BySource[hoarder.SourcePeer])
		originB = append(originB, h.BySource[hoarder.SourceOrigin])
		fallbacks += tn.counters(t).DesignatedFallbacks
	}
	spread := func(v []int64) string {
		s := slices.Clone(v)
		slices.Sort(s)
		return fmt.Sprintf("min %d KiB, median %d KiB, max %d KiB", s[0]>>10, s[len(s)/2]>>10, s[len(s)-1]>>10)
	}
	convSorted := slices.Clone(converged)
	slices.Sort(convSorted)
	t.Logf("%d nodes, %d images in %d families: union of the working sets %d KiB (per image %d..%d KiB); budgets %d KiB, %d small nodes %d KiB",
		sh.nodes, images, len(sh.families), c.union>>10, slices.Min(c.ws)>>10, slices.Max(c.ws)>>10, bigBudget>>10, sh.small, smallBudget>>10)
	t.Logf("converged in %v (per node: min %v, median %v, max %v)", took.Round(time.Millisecond),
		convSorted[0].Round(time.Millisecond), convSorted[len(convSorted)/2].Round(time.Millisecond), convSorted[len(convSorted)-1].Round(time.Millisecond))
	t.Logf("origin sent %d KiB after the adds (%.3fx the union); the adds read %d KiB; designated fallbacks %d", got>>10, float64(got)/float64(c.union), imported>>10, fallbacks)
	t.Logf("hoard traffic per node (peer+origin): %s", spread(traffic))
	t.Logf("  from peers: %s; from the origin: %s", spread(peerB), spread(originB))
	for i := sh.nodes - sh.small; i < sh.nodes; i++ {
		s, err := cl[i].Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		// The store also keeps what the node fetched as a designated fetcher
		// for the boots (copy-on-read, outside the hoard): the hoarder's own
		// fetches are what must fit the budget.
		hoarded := last[i].BySource[hoarder.SourcePeer] + last[i].BySource[hoarder.SourceOrigin]
		ratio := float64(s.Store.StoredBytes) / float64(max(s.Store.RawBytes, 1))
		t.Logf("  small node %d: held %d + planned %d of a budget of %d stored bytes; hoarded %d raw (~%d stored) bytes; the store holds %d stored (%d raw) bytes in %d chunks, %d origin bytes fetched for peers",
			i, last[i].HeldBytes, last[i].PlannedBytes, last[i].Budget, hoarded, int64(float64(hoarded)*ratio), s.Store.StoredBytes, s.Store.RawBytes, s.Store.Chunks, s.Counters.OriginBytes)
		// The plan itself is held within the budget (checked above); what a
		// node fetched in all may exceed it by the chunks later plans dropped
		// as profiles arrived (they stay as ordinary, evictable cache):
		// 1.04x in CI, bounded here at 1.25x.
		if float64(hoarded)*ratio > 1.25*float64(smallBudget) {
			t.Errorf("small node %d hoarded %d raw bytes (~%d stored), over 1.25x its budget of %d", i, hoarded, int64(float64(hoarded)*ratio), smallBudget)
		}
	}
	if float64(got) > 1.1*float64(c.union) {
		t.Errorf("origin sent %d bytes for a union of working sets of %d: more than 1.1x", got, c.union)
	}
}
