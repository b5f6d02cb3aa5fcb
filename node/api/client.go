package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/hoarder"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/p2p"
)

// Client talks to a daemon's admin API.
type Client struct {
	Base  string // http://127.0.0.1:7480
	Token string
	HTTP  *http.Client // nil: a client without overall timeout (imports take long)
}

// NewClient returns a client for addr ("host:port" or a URL).
func NewClient(addr, token string) *Client {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	return &Client{Base: strings.TrimRight(addr, "/"), Token: token}
}

// Ping reports whether a daemon answers at the client's address within timeout.
func (c *Client) Ping(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return c.do(ctx, http.MethodGet, "/healthz", nil, nil)
}

// Status returns GET /v1/status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Images returns GET /v1/images.
func (c *Client) Images(ctx context.Context) ([]ImageInfo, error) {
	var l []ImageInfo
	return l, c.do(ctx, http.MethodGet, "/v1/images", nil, &l)
}

// Image returns GET /v1/images/{name}.
func (c *Client) Image(ctx context.Context, name string, entries bool) (ImageDetail, error) {
	var d ImageDetail
	p := "/v1/images/" + url.PathEscape(name)
	if entries {
		p += "?entries=1"
	}
	return d, c.do(ctx, http.MethodGet, p, nil, &d)
}

// AddImage asks the daemon to import an image.
func (c *Client) AddImage(ctx context.Context, req ImportRequest) (*importer.Result, error) {
	return c.AddImageProgress(ctx, req, nil)
}

// AddImageProgress is AddImage; progress, if not nil, is called from this
// goroutine with the import's progress as the daemon reports it (bytes
// read from the source of its size), at most a few times a second.
// Cancelling ctx (or dropping the connection) cancels the import.
func (c *Client) AddImageProgress(ctx context.Context, req ImportRequest, progress func(Progress)) (*importer.Result, error) {
	var res importer.Result
	return &res, c.stream(ctx, http.MethodPost, "/v1/images", req, &res, progress)
}

// RemoveImage asks the daemon to remove an image; with cluster, from every
// node of the cluster.
func (c *Client) RemoveImage(ctx context.Context, name string, cluster bool) (RemoveResult, error) {
	var res RemoveResult
	p := "/v1/images/" + url.PathEscape(name)
	if cluster {
		p += "?cluster=1"
	}
	return res, c.do(ctx, http.MethodDelete, p, nil, &res)
}

// Prefetch asks the daemon to fetch an image's working set (with full, all of
// it) now and pin it, with cluster on every node; progress, if not nil, is
// called as it goes here.
func (c *Client) Prefetch(ctx context.Context, name string, full, cluster bool, progress func(Progress)) (hoarder.PrefetchResult, error) {
	var out hoarder.PrefetchResult
	q := url.Values{}
	if full {
		q.Set("full", "1")
	}
	if cluster {
		q.Set("cluster", "1")
	}
	p := "/v1/images/" + url.PathEscape(name) + "/prefetch"
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	return out, c.stream(ctx, http.MethodPost, p, nil, &out, progress)
}

// Profile returns an image's boot profile.
func (c *Client) Profile(ctx context.Context, name string) (ProfileInfo, error) {
	var p ProfileInfo
	return p, c.do(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(name)+"/profile", nil, &p)
}

// Place ranks hosts for booting image (every live node, or hosts).
func (c *Client) Place(ctx context.Context, image string, hosts []string) (Placement, error) {
	q := url.Values{"image": {image}}
	if len(hosts) > 0 {
		q.Set("hosts", strings.Join(hosts, ","))
	}
	var p Placement
	return p, c.do(ctx, http.MethodGet, "/v1/place?"+q.Encode(), nil, &p)
}

// Peers lists the daemon's peers.
func (c *Client) Peers(ctx context.Context) ([]p2p.PeerInfo, error) {
	var out []p2p.PeerInfo
	return out, c.do(ctx, http.MethodGet, "/v1/peers", nil, &out)
}

// PullImage registers an image known to the cluster, by name or manifest CID.
func (c *Client) PullImage(ctx context.Context, name string) (ImageInfo, error) {
	return c.PullImageProgress(ctx, name, nil)
}

// PullImageProgress is PullImage; progress, if not nil, is called while the
// daemon works on it (see AddImageProgress).
func (c *Client) PullImageProgress(ctx context.Context, name string, progress func(Progress)) (ImageInfo, error) {
	var out ImageInfo
	return out, c.stream(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/pull", nil, &out, progress)
}

// defaultHTTP is the client's HTTP client unless HTTP is set: no overall
// timeout, and idle connections dropped before the daemon drops them (after
// 30 s), so that a request (a POST is not retried) never goes out on a
// connection the daemon is closing.
var defaultHTTP = &http.Client{Transport: func() http.RoundTripper {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.IdleConnTimeout = 20 * time.Second
	return t
}()}

// ErrAPI is wrapped by errors the daemon answered with.
var ErrAPI = errors.New("daemon error")

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	return c.stream(ctx, method, path, in, out, nil)
}

// stream is do; with progress not nil it asks for a streamed answer (see
// StreamEvent), calls progress for each progress line and decodes the
// result line into out. A daemon that answers plainly (an older one) is
// understood too, without progress.
func (c *Client) stream(ctx context.Context, method, path string, in, out any, progress func(Progress)) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.Base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if progress != nil {
		req.Header.Set("Accept", MediaNDJSON+", application/json;q=0.9")
	}
	hc := c.HTTP
	if hc == nil {
		hc = defaultHTTP
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("hoard daemon at %s: %w", c.Base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var e errorBody
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%w: %s", ErrAPI, e.Error)
		}
		return fmt.Errorf("%w: %s %s: HTTP %d: %s", ErrAPI, method, path, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt == MediaNDJSON {
		return c.readStream(resp.Body, method, path, out, progress)
	}
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("hoard daemon at %s: bad answer to %s %s: %w", c.Base, method, path, err)
	}
	return nil
}

// readStream reads a streamed answer to its result line.
func (c *Client) readStream(body io.Reader, method, path string, out any, progress func(Progress)) error {
	dec := json.NewDecoder(body)
	for {
		var ev StreamEvent
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = errors.New("the daemon closed the connection before the result (did it stop? see its log)")
			}
			return fmt.Errorf("hoard daemon at %s: %s %s: %w", c.Base, method, path, err)
		}
		switch {
		case ev.Error != "":
			return fmt.Errorf("%w: %s", ErrAPI, ev.Error)
		case ev.Result != nil:
			if out == nil {
				return nil
			}
			if err := json.Unmarshal(ev.Result, out); err != nil {
				return fmt.Errorf("hoard daemon at %s: bad answer to %s %s: %w", c.Base, method, path, err)
			}
			return nil
		case ev.Progress != nil && progress != nil:
			progress(*ev.Progress)
		}
	}
}

// StoreStats returns GET /v1/store/stats.
func (c *Client) StoreStats(ctx context.Context) (chunkstore.Stats, error) {
	var s chunkstore.Stats
	return s, c.do(ctx, http.MethodGet, "/v1/store/stats", nil, &s)
}

// StoreVerify returns POST /v1/store/verify.
func (c *Client) StoreVerify(ctx context.Context) (chunkstore.VerifyResult, error) {
	return c.StoreVerifyProgress(ctx, nil)
}

// StoreVerifyProgress is StoreVerify; progress, if not nil, is called with
// the chunks checked of the total as the daemon reports them.
func (c *Client) StoreVerifyProgress(ctx context.Context, progress func(Progress)) (chunkstore.VerifyResult, error) {
	var v chunkstore.VerifyResult
	return v, c.stream(ctx, http.MethodPost, "/v1/store/verify", nil, &v, progress)
}

// StoreGC returns POST /v1/store/gc.
func (c *Client) StoreGC(ctx context.Context) (chunkstore.GCResult, error) {
	return c.StoreGCProgress(ctx, nil)
}

// StoreGCProgress is StoreGC; progress, if not nil, is called every few
// seconds while the daemon collects (without counts: Unit is empty).
func (c *Client) StoreGCProgress(ctx context.Context, progress func(Progress)) (chunkstore.GCResult, error) {
	var v chunkstore.GCResult
	return v, c.stream(ctx, http.MethodPost, "/v1/store/gc", nil, &v, progress)
}
