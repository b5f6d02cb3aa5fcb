package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/hoardvm/hoard/planner"
)

// simOptions are hoard sim's flags.
type simOptions struct {
	trace, writeTrace, plot string
	json, hoardUnpinned     bool
	policies, placements    []string
	weights                 string
	gen                     planner.TraceGenConfig
	duration                time.Duration
	quota, hoardBudget      string
	linkRate, originRate    string
	hoardRate               string
	hoardInterval           time.Duration
}

func newSimCommand() *cobra.Command {
	def := planner.DefaultTraceGen(1)
	model := planner.DefaultClusterSimConfig("", "")
	o := &simOptions{gen: def}
	c := &cobra.Command{
		Use:   "sim [--trace FILE] [--json] [--plot FILE.png]",
		Short: "Simulate a cluster's VM starts under each cache policy and placement",
		Long: `hoard sim plays a trace of VM starts, node failures and joins on a simulated
cluster, driving the planner functions the daemon uses (the eviction
policies, planner.Hoard, planner.Place), and compares per policy and
placement: the hit ratio (boot working-set bytes already on the node), bytes
from the origin and between peers, bytes moved per start, start delay (mean
and p99) and placement imbalance (max/mean running VMs per node, averaged
over starts).

Policies: none (every start reads its working set from the origin), lru,
arc, sharing (the store's eviction policies, misses fetched from peers
first, the origin once per chunk cluster-wide), hoard (sharing plus scatter
hoarding: every node keeps the most started working sets within its hoard
budget, from peers first). Placements: random (uniform among nodes with a
free slot) and cache-aware (planner.Place: working-set share local, then
whole-image share, then load).

Model: each node has a store of --quota and a link of --link-rate bytes/s;
the origin --origin-rate bytes/s shared by all. A start's working set costs
nothing where local, link time from a peer, origin time (a FIFO queue
shared cluster-wide) otherwise; a chunk fetched from the origin once serves
the rest of a storm from that peer once it has arrived. Running VMs pin
their working sets. After boot a VM reads part of its image (not counted in
start delay). A failed node loses its cache; its VMs restart elsewhere.
Hoard rounds run every --hoard-interval at --hoard-rate per node, pinning
their plan (--hoard-unpinned: as the daemon's hoarder today).

Without --trace a seeded trace is generated: --nodes nodes of 16 slots,
--images images in OS families (90% ubuntu, as 579 of Squirrel's 607 Azure
images were Ubuntu, then centos, debian, windows) with Zipf(1.1) popularity,
--starts background starts over --duration, --storms boot storms of about
--storm-size VMs of 1 to 3 images within 60 s, --failures node failures
(rejoining empty after 30 min) and --joins new nodes. --write-trace saves it.

Trace format (JSON Lines): a header line, then one event per line:

  {"hoard_trace": 1, "nodes": 200, "slots": 16, "chunk_size": 8388608,
   "images": [{"family": "ubuntu", "size": 4294967296, "ws": 209715200,
               "shared": 0.75, "reads": 214748364}, ...]}
  {"t": 12.5, "type": "start", "image": 7, "dur": 3600}
  {"t": 900, "type": "fail", "node": 3}
  {"t": 2700, "type": "join", "node": 3}

t is seconds; image an index into images; dur how long the VM runs (0: to
the end); the simulator places starts itself. Per image: size (bytes), ws
(boot working set, default 5% of size), shared (fraction of it from the
family's base working set, default 0.7), reads (bytes read after boot,
default 5% of size, -1 none). Working sets derive from the header alone.

--json prints one object per policy and placement: policy, placement,
hit_ratio, origin_bytes, peer_bytes (all bytes moved, hoarding and reads
after boot included), hoard_origin_bytes, hoard_peer_bytes,
read_origin_bytes, read_peer_bytes (their parts), bytes_per_start,
mean_start_s, p99_start_s, imbalance, starts, rejected (starts that found
no free slot). --plot draws them as bar charts into a PNG.`,
		Example: `  hoard sim
  hoard sim --json
  hoard sim --nodes 500 --images 600 --starts 8000 --storms 20 --storm-size 400 --plot sim.png
  hoard sim --write-trace trace.jsonl && hoard sim --trace trace.jsonl`,
		Args:        cobra.NoArgs,
		Annotations: map[string]string{noConfig: "yes"},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runSim(cmd.OutOrStdout(), o)
		},
	}
	f := c.Flags()
	f.StringVar(&o.trace, "trace", "", "trace file to play (JSON Lines, see above; - for stdin); default: generate one")
	f.BoolVar(&o.json, "json", false, "print one JSON object per policy and placement")
	f.StringVar(&o.plot, "plot", "", "write bar charts of the results to this PNG file")
	f.StringVar(&o.writeTrace, "write-trace", "", "write the trace played to this file (JSON Lines)")
	f.StringSliceVar(&o.policies, "policies", planner.ClusterPolicies(), "policies to compare")
	f.StringSliceVar(&o.placements, "placements", []string{planner.PlacementRandom, planner.PlacementCache}, "placements to compare")
	w := planner.DefaultPlaceWeights
	f.StringVar(&o.weights, "weights", fmt.Sprintf("%g,%g,%g", w.WorkingSet, w.Image, w.Load), "cache-aware placement weights: working set, whole image, load")
	f.Uint64Var(&o.gen.Seed, "seed", def.Seed, "seed of the generated trace and of random placement")
	f.IntVar(&o.gen.Nodes, "nodes", def.Nodes, "generated trace: nodes up at the start")
	f.IntVar(&o.gen.Images, "images", def.Images, "generated trace: images")
	f.IntVar(&o.gen.Starts, "starts", def.Starts, "generated trace: background VM starts")
	f.IntVar(&o.gen.Storms, "storms", def.Storms, "generated trace: boot storms")
	f.IntVar(&o.gen.StormSize, "storm-size", def.StormSize, "generated trace: mean VMs per boot storm")
	f.IntVar(&o.gen.Failures, "failures", def.Failures, "generated trace: node failures")
	f.IntVar(&o.gen.Joins, "joins", def.Joins, "generated trace: new nodes joining")
	f.DurationVar(&o.duration, "duration", time.Duration(def.Duration)*time.Second, "generated trace: length")
	f.StringVar(&o.quota, "quota", fmt.Sprintf("%dMiB", model.Quota>>20), "store quota per node")
	f.StringVar(&o.hoardBudget, "hoard-budget", "", "hoard budget per node (default half of --quota)")
	f.StringVar(&o.linkRate, "link-rate", "1.25GB", "node link bandwidth per second")
	f.StringVar(&o.originRate, "origin-rate", "100MB", "origin bandwidth per second, shared by all nodes")
	f.StringVar(&o.hoardRate, "hoard-rate", "50MB", "hoarding bandwidth per node per second")
	f.DurationVar(&o.hoardInterval, "hoard-interval", time.Duration(model.HoardInterval)*time.Second, "time between hoard rounds")
	f.BoolVar(&o.hoardUnpinned, "hoard-unpinned", false, "leave hoarded chunks unpinned (eviction may take them), as the daemon's hoarder does")
	return c
}

func runSim(out io.Writer, o *simOptions) error {
	if o.plot != "" && !strings.HasSuffix(strings.ToLower(o.plot), ".png") {
		return fmt.Errorf("--plot %s: give a file name ending in .png", o.plot)
	}
	for _, p := range o.policies {
		if !slices.Contains(planner.ClusterPolicies(), strings.TrimSpace(p)) {
			return fmt.Errorf("unknown policy %q: give --policies from %s", p, strings.Join(planner.ClusterPolicies(), ","))
		}
	}
	for _, p := range o.placements {
		if p = strings.TrimSpace(p); p != planner.PlacementRandom && p != planner.PlacementCache {
			return fmt.Errorf("unknown placement %q: give --placements from %s,%s", p, planner.PlacementRandom, planner.PlacementCache)
		}
	}
	var tr planner.ClusterTrace
	var err error
	if o.trace != "" {
		if tr, err = readTraceFile(o.trace); err != nil {
			return err
		}
	} else {
		o.gen.Duration = o.duration.Seconds()
		if o.gen.Nodes < 1 || o.gen.Images < 1 || o.gen.Duration <= 0 {
			return errors.New("--nodes, --images and --duration must be positive")
		}
		tr = planner.GenerateTrace(o.gen)
	}
	if o.writeTrace != "" {
		if err := writeTraceFile(o.writeTrace, tr); err != nil {
			return err
		}
	}
	cfg := planner.DefaultClusterSimConfig("", "")
	cfg.Seed = o.gen.Seed
	cfg.HoardUnpinned = o.hoardUnpinned
	cfg.HoardInterval = o.hoardInterval.Seconds()
	for _, s := range []struct {
		flag, val string
		to        *int64
	}{{"quota", o.quota, &cfg.Quota}, {"hoard-budget", o.hoardBudget, &cfg.HoardBudget}} {
		if s.val == "" {
			continue
		}
		if *s.to, err = parseSize(s.val); err != nil {
			return fmt.Errorf("--%s: %w", s.flag, err)
		}
	}
	for _, s := range []struct {
		flag, val string
		to        *float64
	}{{"link-rate", o.linkRate, &cfg.LinkRate}, {"origin-rate", o.originRate, &cfg.OriginRate}, {"hoard-rate", o.hoardRate, &cfg.HoardRate}} {
		n, err := parseSize(s.val)
		if err != nil || n == 0 {
			return fmt.Errorf("--%s %q: give bytes per second with a unit, e.g. 100MB", s.flag, s.val)
		}
		*s.to = float64(n)
	}
	if cfg.Weights, err = parseWeights(o.weights); err != nil {
		return err
	}
	type run struct{ policy, placement string }
	var runs []run
	for _, pl := range o.placements {
		for _, p := range o.policies {
			runs = append(runs, run{strings.TrimSpace(p), strings.TrimSpace(pl)})
		}
	}
	results := make([]planner.ClusterSimResult, len(runs))
	var g errgroup.Group
	g.SetLimit(runtime.GOMAXPROCS(0))
	for i, r := range runs {
		c := cfg
		c.Policy, c.Placement = r.policy, r.placement
		g.Go(func() error {
			res, err := planner.SimulateCluster(tr, c)
			results[i] = res
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if o.plot != "" {
		if err := writeSimPlot(o.plot, results); err != nil {
			return err
		}
	}
	if o.json {
		enc := json.NewEncoder(out)
		for _, r := range results {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
		return nil
	}
	starts := 0
	for _, e := range tr.Events {
		if e.Type == planner.TraceStart {
			starts++
		}
	}
	fmt.Fprintf(out, "trace: %d nodes, %d images, %d events (%d starts); quota %s, link %s/s, origin %s/s\n",
		tr.Header.Nodes, len(tr.Header.Images), len(tr.Events), starts, formatSize(cfg.Quota),
		formatSize(int64(cfg.LinkRate)), formatSize(int64(cfg.OriginRate)))
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "POLICY\tPLACEMENT\tHIT\tORIGIN\tPEER\tHOARDED\tMOVED/START\tMEAN START\tP99 START\tIMBALANCE\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%.3f\t%s\t%s\t%s\t%s\t%.2fs\t%.2fs\t%.2f\t\n", r.Policy, r.Placement, r.HitRatio,
			formatSize(r.OriginBytes), formatSize(r.PeerBytes), formatSize(r.HoardOriginBytes+r.HoardPeerBytes),
			formatSize(int64(r.BytesPerStart)), r.MeanStart, r.P99Start, r.Imbalance)
	}
	return tw.Flush()
}

func readTraceFile(name string) (planner.ClusterTrace, error) {
	var r io.Reader = os.Stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return planner.ClusterTrace{}, fmt.Errorf("open trace: %w", err)
		}
		defer f.Close()
		r = f
	}
	tr, err := planner.ReadTrace(r)
	if err != nil {
		return tr, fmt.Errorf("%s: %w", name, err)
	}
	return tr, nil
}

func writeTraceFile(name string, tr planner.ClusterTrace) error {
	f, err := os.Create(name)
	if err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	if err := planner.WriteTrace(f, tr); err != nil {
		f.Close()
		return fmt.Errorf("write trace %s: %w", name, err)
	}
	return f.Close()
}

// parseWeights parses "ws,image,load".
func parseWeights(s string) (planner.PlaceWeights, error) {
	parts := strings.Split(s, ",")
	bad := fmt.Errorf("--weights %q: give three numbers >= 0, working set, whole image, load, e.g. 0.55,0.15,0.3", s)
	if len(parts) != 3 {
		return planner.PlaceWeights{}, bad
	}
	var v [3]float64
	for i, p := range parts {
		x, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || x < 0 || x != x {
			return planner.PlaceWeights{}, bad
		}
		v[i] = x
	}
	return planner.PlaceWeights{WorkingSet: v[0], Image: v[1], Load: v[2]}, nil
}

// writeSimPlot draws hoard sim's results as four bar charts (hit ratio,
// bytes moved per start, p99 start delay, imbalance), one bar per policy and
// placement, into a PNG, with the standard library only: text is drawn in a
// built-in 3×5 bitmap font.
func writeSimPlot(name string, rs []planner.ClusterSimResult) error {
	panels := []struct {
		title string
		value func(planner.ClusterSimResult) float64
		label func(float64) string
	}{
		{"hit ratio", func(r planner.ClusterSimResult) float64 { return r.HitRatio }, func(v float64) string { return fmt.Sprintf("%.2f", v) }},
		{"mib moved per start", func(r planner.ClusterSimResult) float64 { return r.BytesPerStart / (1 << 20) }, func(v float64) string { return fmt.Sprintf("%.0f", v) }},
		{"mean start s", func(r planner.ClusterSimResult) float64 { return r.MeanStart }, func(v float64) string { return fmt.Sprintf("%.2f", v) }},
		{"p99 start s", func(r planner.ClusterSimResult) float64 { return r.P99Start }, func(v float64) string { return fmt.Sprintf("%.1f", v) }},
		{"imbalance max/mean vms", func(r planner.ClusterSimResult) float64 { return r.Imbalance }, func(v float64) string { return fmt.Sprintf("%.1f", v) }},
	}
	const (
		scale  = 2
		barW   = 44
		gap    = 16
		left   = 20
		panelH = 190
		plotH  = 110
		top    = 40
	)
	width := left*2 + len(rs)*(barW+gap)
	height := top + len(panels)*panelH
	img := image.NewRGBA(image.Rect(0, 0, max(width, 400), height))
	fill(img, img.Bounds(), color.RGBA{255, 255, 255, 255})
	ink := color.RGBA{30, 30, 30, 255}
	colors := map[string]color.RGBA{planner.PlacementRandom: {70, 120, 190, 255}, planner.PlacementCache: {230, 140, 40, 255}}
	drawText(img, left, 10, "hoard sim", ink, 3)
	x := left + 140
	for _, pl := range []string{planner.PlacementRandom, planner.PlacementCache} {
		fill(img, image.Rect(x, 12, x+14, 26), colors[pl])
		drawText(img, x+20, 14, pl, ink, scale)
		x += 20 + textWidth(pl, scale) + 30
	}
	for p, pn := range panels {
		y0 := top + p*panelH
		drawText(img, left, y0+6, pn.title, ink, scale)
		base := y0 + 40 + plotH
		peak := 0.0
		for _, r := range rs {
			peak = math.Max(peak, pn.value(r))
		}
		fill(img, image.Rect(left, base, width-left, base+1), ink)
		for i, r := range rs {
			v := pn.value(r)
			bx := left + gap/2 + i*(barW+gap)
			h := 0
			if peak > 0 {
				h = int(math.Round(v / peak * plotH))
			}
			c, ok := colors[r.Placement]
			if !ok {
				c = color.RGBA{120, 120, 120, 255}
			}
			fill(img, image.Rect(bx, base-h, bx+barW, base), c)
			lbl := pn.label(v)
			drawText(img, bx+(barW-textWidth(lbl, scale))/2, base-h-14, lbl, ink, scale)
			drawText(img, bx+(barW-textWidth(r.Policy, scale))/2, base+6, r.Policy, ink, scale)
		}
	}
	f, err := os.Create(name)
	if err != nil {
		return fmt.Errorf("write plot: %w", err)
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return fmt.Errorf("write plot %s: %w", name, err)
	}
	return f.Close()
}

func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	r = r.Intersect(img.Bounds())
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			img.SetRGBA(x, y, c)
		}
	}
}

// font3x5 is a 3×5 bitmap font: each glyph is five rows of three pixels,
// '#' set. Letters are capitals; lower case is drawn as upper case.
var font3x5 = map[rune]string{
	'0': "####.##.##.####", '1': ".#.##..#..#.###", '2': "###..#####..###", '3': "###..####..####",
	'4': "#.##.####..#..#", '5': "####..###..####", '6': "####..####.####", '7': "###..#..#..#..#",
	'8': "####.#####.####", '9': "####.####..####", 'A': ".#.#.#####.##.#", 'B': "##.#.###.#.###.",
	'C': "####..#..#..###", 'D': "##.#.##.##.###.", 'E': "####..##.#..###", 'F': "####..##.#..#..",
	'G': "####..#.##.####", 'H': "#.##.#####.##.#", 'I': "###.#..#..#.###", 'J': "..#..#..##.####",
	'K': "#.##.###.#.##.#", 'L': "#..#..#..#..###", 'M': "#.########.##.#", 'N': "##.#.##.##.##.#",
	'O': "####.##.##.####", 'P': "####.#####..#..", 'Q': "####.##.####..#", 'R': "##.#.###.#.##.#",
	'S': "####..###..####", 'T': "###.#..#..#..#.", 'U': "#.##.##.##.####", 'V': "#.##.##.##.#.#.",
	'W': "#.##.########.#", 'X': "#.##.#.#.#.##.#", 'Y': "#.##.#.#..#..#.", 'Z': "###..#.#.#..###",
	'.': ".............#.", '-': "......###......", '/': "..#..#.#.#..#..", '%': "#.#..#.#.#..#.#",
	':': "....#.....#....", '(': ".#.#..#..#...#.", ')': ".#...#..#..#.#.", ' ': "...............",
}

func textWidth(s string, scale int) int { return len([]rune(s)) * 4 * scale }

func drawText(img *image.RGBA, x, y int, s string, c color.RGBA, scale int) {
	for _, r := range strings.ToUpper(s) {
		g, ok := font3x5[r]
		if !ok {
			g = font3x5[' ']
		}
		for i, px := range g {
			if px == '#' {
				gx, gy := x+(i%3)*scale, y+(i/3)*scale
				fill(img, image.Rect(gx, gy, gx+scale, gy+scale), c)
			}
		}
		x += 4 * scale
	}
}
