package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// simArgs generate a small trace, fast under the race detector.
var simArgs = []string{"sim", "--nodes", "16", "--images", "30", "--starts", "150", "--storms", "2", "--storm-size", "20",
	"--duration", "1h", "--failures", "2", "--joins", "1", "--quota", "1GiB"}

// runSimCommand runs hoard sim in process and returns its output.
func runSimCommand(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestSimJSON(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tracePath, plotPath := filepath.Join(dir, "trace.jsonl"), filepath.Join(dir, "sim.png")
	out, err := runSimCommand(t, append(simArgs, "--json", "--write-trace", tracePath, "--plot", plotPath)...)
	if err != nil {
		t.Fatalf("hoard sim: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 10 {
		t.Fatalf("%d lines, want one per policy and placement (10):\n%s", len(lines), out)
	}
	seen := map[string]bool{}
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		for _, f := range []string{"policy", "placement", "hit_ratio", "origin_bytes", "peer_bytes", "mean_start_s", "p99_start_s", "imbalance", "bytes_per_start"} {
			if _, ok := m[f]; !ok {
				t.Fatalf("line %q has no %s", l, f)
			}
		}
		seen[m["policy"].(string)+"/"+m["placement"].(string)] = true
	}
	for _, p := range []string{"none", "lru", "arc", "sharing", "hoard"} {
		for _, pl := range []string{"random", "cache-aware"} {
			if !seen[p+"/"+pl] {
				t.Fatalf("no result for %s/%s:\n%s", p, pl, out)
			}
		}
	}
	// The trace written and read back gives the same results.
	again, err := runSimCommand(t, "sim", "--json", "--trace", tracePath, "--quota", "1GiB")
	if err != nil || again != out {
		t.Fatalf("replaying the written trace: %v\n%s\nwant\n%s", err, again, out)
	}
	f, err := os.Open(plotPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(bufio.NewReader(f))
	if err != nil || img.Bounds().Dx() < 400 || img.Bounds().Dy() < 400 {
		t.Fatalf("plot: %v %v", err, img)
	}
}

func TestSimTable(t *testing.T) {
	t.Parallel()
	out, err := runSimCommand(t, append(simArgs, "--policies", "none,hoard", "--placements", "cache-aware")...)
	if err != nil {
		t.Fatalf("hoard sim: %v\n%s", err, out)
	}
	for _, want := range []string{"POLICY", "P99 START", "IMBALANCE", "none", "hoard", "cache-aware"} {
		if !strings.Contains(out, want) {
			t.Fatalf("table lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(strings.TrimSpace(out), "\n"); n != 3 {
		t.Fatalf("%d lines after the first, want a header and 2 rows:\n%s", n, out)
	}
}

func TestSimBadInput(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.jsonl")
	if err := os.WriteFile(bad, []byte(`{"hoard_trace": 1, "nodes": 2, "images": [{"family": "ubuntu", "size": 1073741824}]}
{"t": 0, "type": "start", "image": 0}
{"t": 1, "type": "boot", "image": 0}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"sim", "--trace", bad}, "line 3: type \"boot\" unknown"},
		{[]string{"sim", "--trace", filepath.Join(dir, "missing")}, "open trace"},
		{[]string{"sim", "--policies", "fifo"}, "unknown policy \"fifo\""},
		{[]string{"sim", "--weights", "1,2"}, "--weights"},
		{[]string{"sim", "--quota", "2G"}, "ambiguous"},
		{[]string{"sim", "--plot", filepath.Join(dir, "x.gif")}, ".png"},
	} {
		out, err := runSimCommand(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("hoard %v: error %v, want one containing %q\n%s", tc.args, err, tc.want, out)
		}
	}
}
