package main

import (
	"bytes"
	"context"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// hoardBounded runs the binary in dir with env, killed after 30 s (a config
// error that is not caught would leave a daemon running).
func hoardBounded(t *testing.T, dir string, env []string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, hoardBin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("hoard %s still running after 30s (the config error was not caught)\n%s", strings.Join(args, " "), errb.String())
	}
	return out.String(), errb.String(), err
}

// TestConfigErrors: a typo in a key (file or environment) or a bad value
// stops the daemon and every other command, with the key named.
func TestConfigErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		file string // hoard.yaml in the working directory
		env  []string
		args []string
		want []string // all in stderr
	}{
		{name: "unknown file key", file: "store:\n  qouta: 5GiB\n", args: []string{"daemon"},
			want: []string{`unknown key "store.qouta"`, "did you mean store.quota?", "hoard.yaml"}},
		{name: "dash in file key", file: "data-dir: /srv/hoard\n", args: []string{"image", "ls"},
			want: []string{`unknown key "data-dir"`, "did you mean data_dir?"}},
		{name: "env-only key in file", file: "api: 127.0.0.1:7481\n", args: []string{"image", "ls"},
			want: []string{"api can only be set in the environment, as HOARD_API"}},
		{name: "unknown env", env: []string{"HOARD_STORE_QOUTA=5GiB"}, args: []string{"daemon"},
			want: []string{"unknown variable HOARD_STORE_QOUTA", "did you mean HOARD_STORE_QUOTA?"}},
		{name: "unknown env in a section", env: []string{"HOARD_P2P_PORT=4001"}, args: []string{"image", "ls"},
			want: []string{"unknown variable HOARD_P2P_PORT"}},
		{name: "ambiguous size", args: []string{"--store-quota", "10G", "image", "ls"},
			want: []string{"store.quota (from flag --store-quota)", `"10G"`, "10GiB", "10GB"}},
		{name: "bad size in file", file: "cache:\n  memory: lots\n", args: []string{"daemon"},
			want: []string{"cache.memory (from file ", `"lots"`, "explicit unit"}},
		{name: "bad size in env", env: []string{"HOARD_NBD_MAX_BUFFERED=1X"}, args: []string{"daemon"},
			want: []string{"nbd.max_buffered (from env HOARD_NBD_MAX_BUFFERED)"}},
		{name: "bad rate", args: []string{"daemon", "--p2p-upload-limit", "fast"},
			want: []string{"p2p.upload_limit (from flag --p2p-upload-limit)", "bytes per second"}},
		{name: "bad listen multiaddr", file: "p2p:\n  listen: [/ip4/0.0.0.0/tpc/4001]\n", args: []string{"daemon"},
			want: []string{"p2p.listen (from file ", "/ip4/0.0.0.0/tpc/4001", "multiaddr"}},
		{name: "bootstrap without peer ID", args: []string{"daemon", "--p2p-bootstrap", "/ip4/10.0.0.1/tcp/4001"},
			want: []string{"p2p.bootstrap (from flag --p2p-bootstrap)", "/p2p/ID", "dns:NAME[:PORT]"}},
		{name: "bad peer ID", env: []string{"HOARD_P2P_ALLOW=alice"}, args: []string{"daemon"},
			want: []string{"p2p.allow (from env HOARD_P2P_ALLOW)", `"alice"`, "peer ID"}},
		{name: "no mirror downloads", args: []string{"daemon", "--glance-max-downloads", "0"},
			want: []string{"glance.max_downloads (from flag --glance-max-downloads)", "whole number from 1"}},
		{name: "bad mirror write timeout", env: []string{"HOARD_GLANCE_WRITE_TIMEOUT=soon"}, args: []string{"daemon"},
			want: []string{"glance.write_timeout (from env HOARD_GLANCE_WRITE_TIMEOUT)", "duration"}},
		{name: "bad level", file: "log:\n  level: verbose\n", args: []string{"daemon"},
			want: []string{"log.level (from file ", `"verbose"`, "debug, info, warn or error"}},
		{name: "bad duration", env: []string{"HOARD_ORIGIN_TIMEOUT=30"}, args: []string{"daemon"},
			want: []string{"origin.timeout (from env HOARD_ORIGIN_TIMEOUT)", `"30"`, "30s"}},
		{name: "bad host:port", args: []string{"daemon", "--api-listen", "localhost"},
			want: []string{"api.listen (from flag --api-listen)", "HOST:PORT"}},
		{name: "bad compression", file: "store:\n  compression: lz4\n", args: []string{"image", "ls"},
			want: []string{"store.compression (from file ", "zstd, s2 or none"}},
		{name: "unknown eviction in file", file: "store:\n  eviction: fifo\n", args: []string{"daemon"},
			want: []string{"store.eviction (from file ", `"fifo"`, "lru, arc, sharing"}},
		{name: "unknown eviction in env", env: []string{"HOARD_STORE_EVICTION=mru"}, args: []string{"daemon"},
			want: []string{"store.eviction (from env HOARD_STORE_EVICTION)", `"mru"`, "lru, arc, sharing"}},
		{name: "unknown eviction flag", args: []string{"daemon", "--store-eviction", "random"},
			want: []string{"store.eviction (from flag --store-eviction)", `"random"`, "lru, arc, sharing"}},
		{name: "unquoted socket mode", file: "nbd:\n  socket_mode: 0660\n", args: []string{"daemon"},
			want: []string{"nbd.socket_mode (from file ", `"0660"`}},
		{name: "bad bool", env: []string{"HOARD_ORIGIN_ALLOW_LOOPBACK=maybe"}, args: []string{"daemon"},
			want: []string{"origin.allow_loopback (from env HOARD_ORIGIN_ALLOW_LOOPBACK)", "true or false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if tc.file != "" {
				if err := os.WriteFile(filepath.Join(dir, "hoard.yaml"), []byte(tc.file), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			data := filepath.Join(dir, "data")
			args := append([]string{"--data-dir", data}, tc.args...)
			if tc.args[0] == "daemon" {
				// Should the error not be caught, the daemon must not collide with another.
				if !strings.Contains(strings.Join(tc.args, " "), "--api-listen") {
					args = append(args, "--api-listen", "127.0.0.1:0")
				}
				args = append(args, "--nbd-socket", "-", "--p2p-swarm-key-file", filepath.Join(dir, "none.key"))
			}
			_, stderr, err := hoardBounded(t, dir, tc.env, args...)
			if err == nil {
				t.Fatalf("hoard %s succeeded; want a config error", strings.Join(args, " "))
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr %q does not mention %q", stderr, w)
				}
			}
			if _, err := os.Stat(data); err == nil {
				t.Errorf("the data dir was created despite the config error")
			}
		})
	}
}

// TestConfigShowSources: config show prints each key's effective value and
// where it came from: flag, env, file or default.
func TestConfigShowSources(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "cfg.yaml")
	os.WriteFile(file, []byte("store:\n  quota: 1GiB\nlog:\n  level: warn\np2p:\n  bootstrap: [\"dns:seed:4001\"]\n"), 0o600)
	out, stderr, err := hoardBounded(t, dir, []string{"HOARD_LOG_LEVEL=debug", "HOARD_CACHE_HOT=2GiB"},
		"--config", file, "--data-dir", filepath.Join(dir, "d"), "config", "show", "--json", "--mem-cache", "1MiB")
	if err != nil {
		t.Fatalf("config show: %v\n%s", err, stderr)
	}
	var res struct {
		ConfigFile string `json:"config_file"`
		Keys       []struct {
			Key    string `json:"key"`
			Value  any    `json:"value"`
			Source string `json:"source"`
		} `json:"keys"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if res.ConfigFile != file {
		t.Errorf("config_file %q, want %q", res.ConfigFile, file)
	}
	got := map[string]string{}
	for _, k := range res.Keys {
		b, _ := json.Marshal(k.Value)
		got[k.Key] = string(b) + " from " + k.Source
	}
	for key, want := range map[string]string{
		"data_dir":          `"` + filepath.Join(dir, "d") + `" from flag --data-dir`,
		"store.quota":       `"1GiB" from file ` + file,
		"log.level":         `"debug" from env HOARD_LOG_LEVEL`, // env over file
		"cache.memory":      `"1MiB" from flag --cache-memory`,  // the old flag name
		"cache.hot":         `"2GiB" from env HOARD_CACHE_HOT`,
		"p2p.bootstrap":     `["dns:seed:4001"] from file ` + file,
		"store.compression": `"zstd" from default`,
		"store.eviction":    `"sharing" from default`,
	} {
		if got[key] != want {
			t.Errorf("%s: %s, want %s", key, got[key], want)
		}
	}
	if len(res.Keys) != len(configKeys) {
		t.Errorf("config show printed %d keys, the table has %d", len(res.Keys), len(configKeys))
	}
}

// TestDaemonLogsConfigFile: the daemon says which config file it loaded, or
// that none was found and where it looked.
func TestDaemonLogsConfigFile(t *testing.T) {
	t.Parallel()
	for _, withFile := range []bool{true, false} {
		dir := t.TempDir()
		if withFile {
			os.WriteFile(filepath.Join(dir, "hoard.yaml"), []byte("store:\n  quota: 1GiB\n"), 0o600)
		}
		data := filepath.Join(dir, "data")
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		cmd := exec.CommandContext(ctx, hoardBin, "--data-dir", data, "daemon", "--api-listen", "127.0.0.1:0",
			"--nbd-socket", "-", "--p2p-swarm-key-file", filepath.Join(dir, "none.key"))
		cmd.Dir = dir
		var logs syncBuffer
		cmd.Stderr = &logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		want := "file=" + filepath.Join(dir, "hoard.yaml")
		if !withFile {
			want = "no config file found"
		}
		for !strings.Contains(logs.String(), want) && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		cancel()
		if !strings.Contains(logs.String(), want) {
			t.Errorf("daemon log does not say %q:\n%s", want, logs.String())
		}
		if !withFile && !strings.Contains(logs.String(), "/etc/hoard/hoard.yaml") {
			t.Errorf("daemon log does not say where it looked:\n%s", logs.String())
		}
	}
}

// TestConfigTable: every key the code reads through viper is in the table,
// and every key of the table is in the README's Configuration section.
func TestConfigTable(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	read := map[string]string{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(af, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) != 1 {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || !strings.HasPrefix(sel.Sel.Name, "Get") || sel.Sel.Name == "GetNormalizeFunc" {
				return true
			}
			// The viper instance: v, or g.v.
			recv := ""
			switch x := sel.X.(type) {
			case *ast.Ident:
				recv = x.Name
			case *ast.SelectorExpr:
				recv = x.Sel.Name
			}
			if recv != "v" {
				return true
			}
			if a, ok := call.Args[0].(*ast.SelectorExpr); ok && a.Sel.Name == "name" {
				return true // k.name: a key of the table
			}
			if lit, ok := call.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				key, _ := strconv.Unquote(lit.Value)
				read[key] = fset.Position(call.Pos()).String()
			} else {
				t.Errorf("%s: viper read with a non-literal key; keep keys literal so this test sees them", fset.Position(call.Pos()))
			}
			return true
		})
	}
	if len(read) < 10 {
		t.Fatalf("found only %d viper reads: the scan is broken", len(read))
	}
	for key, pos := range read {
		if configKeyByName(key) == nil {
			t.Errorf("%s reads config key %q, which is not in configKeys (config.go)", pos, key)
		}
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	sec := string(readme)
	if i := strings.Index(sec, "## Configuration"); i >= 0 {
		sec = sec[i:]
		if j := strings.Index(sec[3:], "\n## "); j >= 0 {
			sec = sec[:j+3]
		}
	}
	flags := map[string]bool{}
	for _, k := range configKeys {
		if !strings.Contains(sec, "`"+k.name+"`") && !strings.Contains(sec, k.envName()) {
			t.Errorf("README's Configuration section does not mention %s", k.name)
		}
		if k.flag != "" {
			if flags[k.flag] {
				t.Errorf("flag --%s used by two keys", k.flag)
			}
			flags[k.flag] = true
		}
	}
	root := newRootCommand()
	daemon, _, err := root.Find([]string{"daemon"})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range configKeys {
		if k.flag != "" && daemon.Flags().Lookup(k.flag) == nil && root.PersistentFlags().Lookup(k.flag) == nil {
			t.Errorf("%s: flag --%s is registered nowhere", k.name, k.flag)
		}
	}
}

// TestExampleConfig: hoard.example.yaml is what hoard config example prints,
// mentions every key, and parses and validates both as shipped and with
// every commented-out example value turned on.
func TestExampleConfig(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../hoard.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != exampleConfig() {
		t.Errorf("hoard.example.yaml is stale: regenerate it with go run ./cmd/hoard config example > hoard.example.yaml")
	}
	for _, k := range configKeys {
		leaf := k.name[strings.LastIndex(k.name, ".")+1:]
		if !strings.Contains(string(b), k.envName()) || (k.scope != scopeEnvOnly && !regexp.MustCompile(`(?m)^[ #]*`+leaf+`:`).Match(b)) {
			t.Errorf("hoard.example.yaml does not cover %s", k.name)
		}
	}
	dir := t.TempDir()
	all := regexp.MustCompile(`(?m)^(\s*)# ([a-z_]+: )`).ReplaceAll(b, []byte("$1$2"))
	for name, content := range map[string][]byte{"shipped.yaml": b, "all.yaml": all} {
		file := filepath.Join(dir, name)
		os.WriteFile(file, content, 0o600)
		out, stderr, err := hoardBounded(t, dir, nil, "--config", file, "config", "show")
		if err != nil {
			t.Errorf("%s: config show: %v\n%s\n%s", name, err, stderr, content)
			continue
		}
		if name == "all.yaml" && !strings.Contains(out, "file "+file) {
			t.Errorf("%s: no key came from the file:\n%s", name, out)
		}
	}
}

func TestParseSize(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{"0": 0, "4096": 4096, "10GiB": 10 << 30, "10gib": 10 << 30, "10GB": 10e9,
		"1.5KiB": 1536, "500MB": 500e6, "512 MiB": 512 << 20, "1TiB": 1 << 40, "2KB": 2000, "7B": 7} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	// A lone K/M/G/T means GiB to some tools and GB to others: refused.
	for _, in := range []string{"10G", "10g", "1.5M", "3T", "64K", "lots", "", "-1GiB", "NaN", "Inf", "1e30GiB"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d; want an error", in, got)
		}
	}
}

// TestVersion: hoard --version and hoard version print the version, the
// commit go build embedded and the Go version, even with a broken config.
func TestVersion(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "hoard.yaml"), []byte("bogus: 1\n"), 0o600)
	a, stderr, err := hoardBounded(t, dir, nil, "--version")
	if err != nil {
		t.Fatalf("--version: %v\n%s", err, stderr)
	}
	b, stderr, err := hoardBounded(t, dir, nil, "version")
	if err != nil {
		t.Fatalf("version: %v\n%s", err, stderr)
	}
	if a != b {
		t.Errorf("--version %q and version %q differ", a, b)
	}
	if !regexp.MustCompile(`^hoard \S+ \(commit [^)]+\) go1\.\d+`).MatchString(a) {
		t.Errorf("version %q; want hoard VERSION (commit REV) GOVERSION", a)
	}
	// The build line of make build: version and commit from -ldflags.
	bin := filepath.Join(t.TempDir(), "hoard")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v9.8.7 -X main.commit=0123abc", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "hoard v9.8.7 (commit 0123abc) go1.") {
		t.Errorf("with -ldflags: %q, %v; want hoard v9.8.7 (commit 0123abc) go1...", out, err)
	}
}

// TestDaemonNBDSocketPerms: --nbd-socket-mode and nbd.socket_group reach the
// daemon's socket.
func TestDaemonNBDSocketPerms(t *testing.T) {
	t.Parallel()
	gid := os.Getegid()
	if os.Geteuid() == 0 {
		gid = 1 // root may give it any group
	}
	data := t.TempDir()
	sock := startDaemon(t, data, []string{"HOARD_NBD_SOCKET_GROUP=" + strconv.Itoa(gid)}, "--nbd-socket-mode", "0640")
	var fi os.FileInfo
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if fi, err = os.Stat(sock); err == nil || time.Now().After(deadline) {
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if fi.Mode().Perm() != 0o640 {
		t.Errorf("socket mode %04o, want 0640", fi.Mode().Perm())
	}
	if got := int(fi.Sys().(*syscall.Stat_t).Gid); got != gid {
		t.Errorf("socket group %d, want %d", got, gid)
	}
}
