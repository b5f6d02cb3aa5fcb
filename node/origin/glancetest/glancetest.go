// Package glancetest runs a real OpenStack Glance API (Debian's glance-api, without keystone)
// for tests, through scripts/glance/start-glance.sh.
//
// Glance takes a few seconds to start, so start it once per test binary: either one
// Start(t) in a test whose subtests share it, or Shared(t) from many tests plus StopShared
// in TestMain after m.Run. Tests skip when glance-api is not installed, unless
// HOARD_TEST_REQUIRE_TOOLS=1 (set it in CI, which installs the tools) turns that into a
// failure.
package glancetest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Tenant is the project id Glance records as owner of uploaded images.
const Tenant = "hoardtest"

// StartTimeout bounds how long New waits for Glance to answer GET /versions:
// $HOARD_GLANCE_START_TIMEOUT (a Go duration) or 120s. Glance starts in ~6s on an idle
// 2-core machine but took 50s while other test binaries kept both cores busy.
var StartTimeout = startTimeout()

func startTimeout() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("HOARD_GLANCE_START_TIMEOUT")); err == nil && d > 0 {
		return d
	}
	return 120 * time.Second
}

// Glance is a running glance-api.
type Glance struct {
	url     string
	dir     string
	cmd     *exec.Cmd
	logPath string
	waitErr chan error // receives the process's exit status once
	enforce bool       // projects enforced (NewEnforcing)
	stopped sync.Once
	// Took is how long the start took, until GET /versions answered.
	Took time.Duration
}

// URL is the endpoint, e.g. http://127.0.0.1:40123 (the value of origin.glance.url).
func (g *Glance) URL() string { return g.url }

// Headers are the headers a keystone-less Glance needs on every request
// (origin.Config.GlanceHeaders): an admin of project Tenant. Images uploaded with them
// belong to Tenant.
func (g *Glance) Headers() map[string]string {
	if g.enforce {
		return Identity(Tenant, "admin")
	}
	return map[string]string{"X-Roles": "admin", "X-Tenant-Id": Tenant}
}

// Identity returns the headers keystonemiddleware sets for a validated token of a user in
// project with roles (comma-separated): what a Glance from NewEnforcing trusts.
func Identity(project, roles string) map[string]string {
	return map[string]string{"X-Identity-Status": "Confirmed", "X-Project-Id": project, "X-Tenant-Id": project,
		"X-User-Id": "user-of-" + project, "X-Roles": roles}
}

// StartEnforcing is Start with a Glance that enforces projects (NewEnforcing).
func StartEnforcing(t testing.TB) *Glance {
	t.Helper()
	skipIfMissing(t)
	g, err := NewEnforcing(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Stop)
	t.Logf("project-enforcing glance started at %s in %v", g.URL(), g.Took.Round(time.Millisecond))
	return g
}

// NewEnforcing is New with a Glance that enforces projects the way a keystone-fronted one
// does: its context middleware (a paste pipeline without authtoken) trusts the identity
// headers (Identity), so a private image answers 200 to its project and to admin, 404 to
// another project and 401 to a request without identity.
func NewEnforcing(dir string) (*Glance, error) { return start(dir, true) }

// Start starts a Glance for t and stops it when t ends. It skips t when glance-api is not
// installed (see the package comment).
func Start(t testing.TB) *Glance {
	t.Helper()
	skipIfMissing(t)
	g, err := New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Stop)
	t.Logf("glance started at %s in %v", g.URL(), g.Took.Round(time.Millisecond))
	return g
}

var shared struct {
	once sync.Once
	g    *Glance
	dir  string
	err  error
}

// Shared returns one Glance for the whole test binary, started by the first call. Call
// StopShared from TestMain after m.Run; the process also dies with the test binary.
func Shared(t testing.TB) *Glance {
	t.Helper()
	skipIfMissing(t)
	shared.once.Do(func() {
		shared.dir, shared.err = os.MkdirTemp("", "hoard-glance-")
		if shared.err == nil {
			shared.g, shared.err = New(shared.dir)
		}
		if shared.err == nil {
			t.Logf("shared glance started at %s in %v", shared.g.URL(), shared.g.Took.Round(time.Millisecond))
		}
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.g
}

// StopShared stops the Glance Shared started, if any, and removes its directory.
func StopShared() {
	if shared.g != nil {
		shared.g.Stop()
	}
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
}

func skipIfMissing(t testing.TB) {
	t.Helper()
	for _, bin := range []string{"glance-api", "glance-manage"} {
		if _, err := exec.LookPath(bin); err != nil {
			msg := bin + " not installed; run scripts/install-test-deps.sh (as root) to run the real Glance tests"
			if os.Getenv("HOARD_TEST_REQUIRE_TOOLS") == "1" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
}

// Script is the path of start-glance.sh: $HOARD_GLANCE_SCRIPT, or found from this
// source file's location in the repository.
func Script() string {
	if p := os.Getenv("HOARD_GLANCE_SCRIPT"); p != "" {
		return p
	}
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "scripts", "glance", "start-glance.sh")
}

// New starts glance-api with its config, database and images in dir and waits until it
// answers. The caller must call Stop. On failure the error carries the tail of Glance's log.
func New(dir string) (*Glance, error) { return start(dir, false) }

func start(dir string, enforce bool) (*Glance, error) {
	script := Script()
	if _, err := os.Stat(script); err != nil {
		return nil, fmt.Errorf("glancetest: launcher script: %w; set HOARD_GLANCE_SCRIPT to scripts/glance/start-glance.sh", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("glancetest: pick a port: %w", err)
	}
	logPath := filepath.Join(dir, "glance-api.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("glancetest: %w", err)
	}
	defer logf.Close()
	start := time.Now()
	cmd := exec.Command(script, dir, fmt.Sprint(port))
	cmd.Stdout, cmd.Stderr = logf, logf
	if enforce {
		cmd.Env = append(os.Environ(), "HOARD_GLANCE_ENFORCE=1")
	}
	// Own process group, so Stop also ends the worker glance-api forks; and die with the
	// test binary if it never calls Stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	g := &Glance{
		url:     fmt.Sprintf("http://127.0.0.1:%d", port),
		dir:     dir,
		cmd:     cmd,
		logPath: logPath,
		waitErr: make(chan error, 1),
		enforce: enforce,
	}
	// Pdeathsig fires when the OS thread that started the child exits, so start and wait
	// on one locked thread that lives exactly as long as the child.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		g.waitErr <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("glancetest: start %s: %w", script, err)
	}

	deadline := time.Now().Add(StartTimeout)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := client.Get(g.url + "/versions")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode < 500 {
				g.Took = time.Since(start)
				return g, nil
			}
		}
		select {
		case werr := <-g.waitErr:
			g.waitErr <- werr
			g.Stop()
			return nil, fmt.Errorf("glancetest: glance-api exited before answering (%v); log tail:\n%s", werr, g.LogTail(40))
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			g.Stop()
			return nil, fmt.Errorf("glancetest: glance-api did not answer GET %s/versions within %v (raise HOARD_GLANCE_START_TIMEOUT on a slow machine); log tail:\n%s", g.url, StartTimeout, g.LogTail(40))
		}
	}
}

// Stop ends glance-api (SIGTERM, SIGKILL after 10s) and waits for it.
func (g *Glance) Stop() {
	g.stopped.Do(func() {
		pgid := g.cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-g.waitErr:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-g.waitErr
		}
		// The forked worker may outlive the parent for a moment.
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	})
}

// LogTail returns the last n lines of Glance's log (db_sync and glance-api output).
func (g *Glance) LogTail(n int) string {
	var out []string
	for _, p := range []string{filepath.Join(g.dir, "db_sync.log"), g.logPath} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		out = append(out, "== "+filepath.Base(p)+" ==")
		out = append(out, lines...)
	}
	return strings.Join(out, "\n")
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func (g *Glance) request(ctx context.Context, method, path, contentType string, body []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, g.url+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	for k, v := range g.Headers() {
		req.Header.Set(k, v)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	return http.DefaultClient.Do(req)
}

// Upload creates an image called name with diskFormat ("raw", "qcow2"), uploads data, and
// returns its id once Glance reports it active.
func (g *Glance) Upload(t testing.TB, name, diskFormat string, data []byte) (id string) {
	t.Helper()
	id, err := g.upload(context.Background(), name, diskFormat, data)
	if err != nil {
		t.Fatalf("glancetest: upload %q: %v\nglance log tail:\n%s", name, err, g.LogTail(20))
	}
	return id
}

func (g *Glance) upload(ctx context.Context, name, diskFormat string, data []byte) (string, error) {
	meta, _ := json.Marshal(map[string]string{"name": name, "disk_format": diskFormat, "container_format": "bare"})
	resp, err := g.request(ctx, http.MethodPost, "/v2/images", "application/json", meta)
	if err != nil {
		return "", err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("POST /v2/images: HTTP %d: %s", resp.StatusCode, body)
	}
	var img struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(body, &img); err != nil || img.ID == "" {
		return "", fmt.Errorf("POST /v2/images: no id in %s", body)
	}
	resp, err = g.request(ctx, http.MethodPut, "/v2/images/"+img.ID+"/file", "application/octet-stream", data)
	if err != nil {
		return "", err
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		return "", fmt.Errorf("PUT /v2/images/%s/file: HTTP %d: %s", img.ID, resp.StatusCode, body)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		status, err := g.status(ctx, img.ID)
		if err != nil {
			return "", err
		}
		if status == "active" {
			return img.ID, nil
		}
		if status == "killed" || time.Now().After(deadline) {
			return "", fmt.Errorf("image %s is %q after upload", img.ID, status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (g *Glance) status(ctx context.Context, id string) (string, error) {
	resp, err := g.request(ctx, http.MethodGet, "/v2/images/"+id, "", nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var img struct {
		Status string `json:"status"`
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /v2/images/%s: HTTP %d", id, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&img); err != nil {
		return "", errors.New("GET /v2/images/" + id + ": " + err.Error())
	}
	return img.Status, nil
}
