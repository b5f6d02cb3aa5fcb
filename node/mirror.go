package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/glancemirror"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"
)

// DefaultGlanceRegisterWait is the default of Config.GlanceRegisterWait.
const DefaultGlanceRegisterWait = 2 * time.Minute

// mirrorImages implements glancemirror.Images over the node: images come
// from the read path (local store, peers, origin through the designated
// fetcher); an image no node knows is registered by streaming it from Glance
// once, into the store and to the client at the same time.
//
// In a cluster, one node registers an unknown image for everyone: the
// registrar, the rendezvous choice (p2p.Designated) over this node and its
// connected peers for the Glance ID. Another node asked for it waits (at most
// Config.GlanceRegisterWait) until the registrar's registration reaches it
// through the catalog or the DHT, then streams it through the read path; only
// if that does not happen does it register the image itself.
type mirrorImages struct {
	n *Node

	mu   sync.Mutex
	regs map[string]*mirrorReg // Glance ID -> this node's registration under way
}

// mirrorReg is one registration under way on this node.
type mirrorReg struct {
	done chan struct{}
	err  error // set before done is closed
}

func newMirrorImages(n *Node) *mirrorImages {
	return &mirrorImages{n: n, regs: map[string]*mirrorReg{}}
}

// lookup finds the image registered here for meta.ID, asking the cluster
// when pull is set.
func (mi *mirrorImages) lookup(ctx context.Context, meta glancemirror.Meta, pull bool) (chunkstore.ID, error) {
	n := mi.n
	id, err := n.resolvePlace(ctx, meta.ID)
	if errors.Is(err, chunkstore.ErrNotFound) && pull && n.cl != nil {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, perr := n.PullImage(pctx, meta.ID)
		cancel()
		if perr == nil {
			id, err = n.resolvePlace(ctx, meta.ID)
		}
	}
	if errors.Is(err, chunkstore.ErrNotFound) {
		return id, fmt.Errorf("glance image %s: %w", meta.ID, glancemirror.ErrUnknown)
	}
	return id, err
}

// Open implements glancemirror.Images.
func (mi *mirrorImages) Open(ctx context.Context, meta glancemirror.Meta) (glancemirror.Image, error) {
	id, err := mi.lookup(ctx, meta, true)
	if err != nil {
		return nil, err
	}
	return mi.open(ctx, meta, id)
}

func (mi *mirrorImages) open(ctx context.Context, meta glancemirror.Meta, id chunkstore.ID) (glancemirror.Image, error) {
	img, err := mi.n.image(ctx, id)
	if err != nil {
		return nil, err
	}
	m := img.m
	if meta.Size != nil && m.Size != *meta.Size {
		return nil, fmt.Errorf("hoard's image %s (manifest %s) is %d bytes, Glance's original is %d: it is not the original file (a guest view?); remove it with hoard image rm %s",
			meta.ID, id, m.Size, *meta.Size, meta.ID)
	}
	if want := glanceChecksums(meta); m.Source.Checksum != "" && len(want) > 0 && !want[strings.ToLower(m.Source.Checksum)] {
		return nil, fmt.Errorf("hoard's image %s (manifest %s) was imported with checksum %s, Glance's image has another; remove it with hoard image rm %s",
			meta.ID, id, m.Source.Checksum, meta.ID)
	}
	x := &export{n: mi.n, img: img, name: meta.ID}
	x.next.Store(-1)
	return mirrorImage{x}, nil
}

// glanceChecksums are the checksums an import of meta's image records.
func glanceChecksums(meta glancemirror.Meta) map[string]bool {
	out := map[string]bool{}
	if meta.OSHashAlgo != "" && meta.OSHashValue != "" {
		out[strings.ToLower(meta.OSHashAlgo+":"+meta.OSHashValue)] = true
	}
	if meta.Checksum != "" {
		out["md5:"+strings.ToLower(meta.Checksum)] = true
	}
	return out
}

// mirrorImage reads an image through the read path. It does not attach an
// export: a download is no boot, so it records no profile.
type mirrorImage struct{ x *export }

func (m mirrorImage) Size() int64 { return m.x.img.m.Size }

func (m mirrorImage) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.x.img.touch()
	return m.x.ReadAt(ctx, p, off)
}

func (m mirrorImage) Close() error { return nil }

// Register implements glancemirror.Images.
func (mi *mirrorImages) Register(ctx context.Context, meta glancemirror.Meta) (io.ReadCloser, error) {
	n := mi.n
	if n.cl != nil {
		if reg, self := mi.registrar(meta.ID); !self {
			rc, err := mi.await(ctx, meta, reg)
			if err == nil {
				return rc, nil
			}
			if ctx.Err() != nil {
				return nil, err
			}
			n.log.Info("glance mirror: the registrar did not register the image in time; registering it here", "glance_image", meta.ID, "registrar", reg, "err", err)
		}
	}
	return mi.register(ctx, meta)
}

// registrar returns the node that registers Glance image id for the
// cluster, and whether that is this node.
func (mi *mirrorImages) registrar(id string) (peer.ID, bool) {
	p := mi.n.cl.Peer()
	self := p.ID()
	peers := []peer.ID{self}
	for _, pi := range p.Peers() {
		if !pi.Connected {
			continue
		}
		if pid, err := peer.Decode(pi.ID); err == nil {
			peers = append(peers, pid)
		}
	}
	d := p2p.Designated(chunkstore.Sum([]byte("hoard glance mirror registrar "+id)), peers)
	return d, d == self
}

// await waits for the registrar's registration to reach this node and
// streams the image through the read path.
func (mi *mirrorImages) await(ctx context.Context, meta glancemirror.Meta, reg peer.ID) (io.ReadCloser, error) {
	wait := mi.n.cfg.GlanceRegisterWait
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	mi.n.log.Info("glance mirror: waiting for the registrar to register the image", "glance_image", meta.ID, "registrar", reg, "max_wait", wait)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		// Locally first (the catalog registers it); the DHT now and then.
		id, err := mi.lookup(wctx, meta, i%4 == 3)
		if err == nil {
			img, err := mi.open(ctx, meta, id)
			if err != nil {
				return nil, err
			}
			return io.NopCloser(glancemirror.NewReader(ctx, img)), nil
		}
		if !errors.Is(err, glancemirror.ErrUnknown) {
			return nil, err
		}
		select {
		case <-wctx.Done():
			return nil, fmt.Errorf("glance image %s: no registration from %s within %v: %w", meta.ID, reg, wait, wctx.Err())
		case <-tick.C:
		}
	}
}

// register streams the image from Glance (hoard's credentials) into the
// store, teeing the bytes to the returned reader; a second download of the
// same image on this node waits for the first registration and then reads
// the registered image.
func (mi *mirrorImages) register(ctx context.Context, meta glancemirror.Meta) (io.ReadCloser, error) {
	n := mi.n
	mi.mu.Lock()
	if r := mi.regs[meta.ID]; r != nil {
		mi.mu.Unlock()
		select {
		case <-r.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if r.err != nil {
			return nil, r.err
		}
		id, err := mi.lookup(ctx, meta, false)
		if err != nil {
			return nil, err
		}
		img, err := mi.open(ctx, meta, id)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(glancemirror.NewReader(ctx, img)), nil
	}
	r := &mirrorReg{done: make(chan struct{})}
	mi.regs[meta.ID] = r
	mi.mu.Unlock()
	finish := func(err error) {
		mi.mu.Lock()
		delete(mi.regs, meta.ID)
		mi.mu.Unlock()
		r.err = err
		close(r.done)
	}

	runCtx := n.runCtx
	src, err := origin.Open(ctx, "glance://"+meta.ID, n.cfg.Origin)
	if err != nil {
		err = fmt.Errorf("open glance://%s with hoard's Glance credentials (origin.glance.token, origin.glance.headers): %w", meta.ID, err)
		finish(err)
		return nil, err
	}
	if meta.Size != nil && src.Size() != *meta.Size {
		src.Close()
		err := fmt.Errorf("glance image %s: %d bytes to hoard's credentials, %d to the caller's", meta.ID, src.Size(), *meta.Size)
		finish(err)
		return nil, err
	}
	pr, pw := io.Pipe()
	ts := &teeSource{Source: src, w: pw}
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		defer src.Close()
		start := time.Now()
		// The mirror serves the original bytes: a qcow2 stays a file, not its guest view.
		res, err := importer.Import(runCtx, n.store, ts, importer.Options{Name: meta.ID, Format: importer.FormatRaw})
		if errors.Is(err, chunkstore.ErrExists) {
			// Registered meanwhile (by the catalog): the stream was read
			// and verified to its end all the same.
			err = nil
		} else if err == nil {
			n.advertiseLater(res.Name, res.Manifest)
			n.announce(runCtx, res.Manifest)
			n.log.Info("glance mirror: image registered", "glance_image", meta.ID, "manifest", res.Manifest, "size", res.Size,
				"new_chunks", res.NewChunks, "took", time.Since(start).Round(time.Millisecond))
		}
		if err != nil {
			n.log.Warn("glance mirror: registering the image failed; nothing was registered", "glance_image", meta.ID, "err", err)
			err = fmt.Errorf("register glance image %s: %w", meta.ID, err)
		}
		pw.CloseWithError(err)
		finish(err)
	}()
	return pr, nil
}

// teeSource is an origin.Source whose stream also goes to w, as long as w
// takes it (a client that went away stops the copy, not the import).
type teeSource struct {
	origin.Source
	w *io.PipeWriter
}

func (t *teeSource) Format() string {
	if f, ok := t.Source.(origin.Formatter); ok {
		return f.Format()
	}
	return ""
}

func (t *teeSource) Stream(ctx context.Context) (io.ReadCloser, error) {
	rc, err := t.Source.Stream(ctx)
	if err != nil {
		return nil, err
	}
	return &teeReader{rc: rc, w: t.w}, nil
}

type teeReader struct {
	rc      io.ReadCloser
	w       *io.PipeWriter
	stopped bool
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.rc.Read(p)
	if n > 0 && !t.stopped {
		if _, werr := t.w.Write(p[:n]); werr != nil {
			t.stopped = true
		}
	}
	return n, err
}

func (t *teeReader) Close() error { return t.rc.Close() }

// serveGlanceMirror serves the Glance mirror on ln under g until ctx ends.
func (n *Node) serveGlanceMirror(ctx context.Context, g *errgroup.Group, ln net.Listener) error {
	h, err := glancemirror.New(glancemirror.Config{GlanceURL: n.cfg.Origin.GlanceURL, Images: newMirrorImages(n),
		Log: n.baseLog.With("component", "glancemirror")})
	if err != nil {
		return err
	}
	// Counted like the admin API's requests: Run waits for them before it
	// closes the store they read.
	hs := &http.Server{Handler: n.handlers.track(h), ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	g.Go(func() error {
		if err := hs.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("glance mirror: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return hs.Shutdown(sctx)
	})
	n.log.Info("serving the Glance mirror", "addr", ln.Addr().String(), "glance", origin.Redact(n.cfg.Origin.GlanceURL),
		"nova_conf", "[glance] endpoint_override = http://"+ln.Addr().String())
	return nil
}
