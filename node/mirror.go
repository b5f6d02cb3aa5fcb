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
	"sync/atomic"
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
const DefaultGlanceRegisterWait = 30 * time.Second

// FileViewPrefix starts the name under which the Glance mirror registers an
// image's original file bytes when the image is a container (qcow2, vmdk,
// vhdx, vdi, vpc): "glance-file:<glance image id>". The image's own name, the
// Glance ID, stays free for its guest view (image add glance://ID, exported
// raw over NBD). Glance IDs are UUIDs, which never contain ':', so the
// prefix cannot clash with one; do not name images glance-file:... by hand.
const FileViewPrefix = p2p.GlanceFileViewPrefix

// fileViewName is the name of Glance image id's file view.
func fileViewName(id string) string { return FileViewPrefix + id }

// mirrorImages implements glancemirror.Images over the node: images come
// from the read path (local store, peers, origin through the designated
// fetcher); an image no node knows is registered by streaming it from Glance
// once, into the store and to the client at the same time.
//
// The mirror serves Glance's original bytes: an image this node holds only as
// its guest view (a qcow2 added with --format auto, exported raw) is not
// served as it is: its file view is registered (streamed from Glance once,
// under fileViewName) and served from then on, here and on every node.
//
// In a cluster, one node registers an unknown image for everyone: the
// registrar, the rendezvous choice (p2p.Designated) over this node and its
// connected peers for the Glance ID. Another node asked for it asks the
// registrar to register it now (p2p.ProtocolGlanceRegister) and, once it
// answers, streams the image through the read path; when the registrar
// cannot be asked, fails, or reports no progress for
// Config.GlanceRegisterWait, the node registers the image itself.
type mirrorImages struct {
	n *Node

	mu   sync.Mutex
	regs map[string]*mirrorReg // Glance ID -> this node's registration under way
}

// mirrorReg is one registration under way on this node.
type mirrorReg struct {
	done       chan struct{}
	read, size atomic.Int64 // bytes read from Glance so far, of size
	// verifies: the origin stream checks one of the caller's checksums
	// (glanceChecksums of the Meta start was given).
	verifies bool
	// Set before done is closed.
	manifest chunkstore.ID
	name     string
	err      error
}

func newMirrorImages(n *Node) *mirrorImages {
	return &mirrorImages{n: n, regs: map[string]*mirrorReg{}}
}

// isView reports whether m is a guest view (not the origin's file bytes).
func isView(m *chunkstore.Manifest) bool { return m.Container != "" }

// localFile finds the image registered on this node for Glance image id
// that holds its file bytes: the file view, or the image named id when it
// is no guest view.
func (mi *mirrorImages) localFile(ctx context.Context, id string) (chunkstore.ID, string, error) {
	st := mi.n.store
	if m, err := st.Resolve(ctx, fileViewName(id)); err == nil {
		return m, fileViewName(id), nil
	} else if !errors.Is(err, chunkstore.ErrNotFound) {
		return chunkstore.ID{}, "", err
	}
	m, err := mi.n.resolvePlace(ctx, id)
	if err != nil {
		return chunkstore.ID{}, "", err
	}
	img, err := mi.n.image(ctx, m)
	if err != nil {
		return chunkstore.ID{}, "", err
	}
	if isView(img.m) {
		return chunkstore.ID{}, "", fmt.Errorf("glance image %s is here only as its %s guest view: %w", id, img.m.Container, chunkstore.ErrNotFound)
	}
	return m, id, nil
}

// lookup finds the image registered here for meta.ID that holds its file
// bytes, asking the cluster when pull is set.
func (mi *mirrorImages) lookup(ctx context.Context, meta glancemirror.Meta, pull bool) (chunkstore.ID, error) {
	n := mi.n
	id, _, err := mi.localFile(ctx, meta.ID)
	if errors.Is(err, chunkstore.ErrNotFound) && pull && n.cl != nil {
		// The name the mirror registers such an image under first.
		names := []string{meta.ID, fileViewName(meta.ID)}
		if origin.ContainerOf(meta.DiskFormat) != "" {
			names[0], names[1] = names[1], names[0]
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		for _, name := range names {
			if _, perr := n.PullImage(pctx, name); perr == nil {
				if id, _, err = mi.localFile(ctx, meta.ID); err == nil {
					break
				}
			}
		}
		cancel()
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
	if isView(m) {
		return nil, fmt.Errorf("hoard's image %s (manifest %s) is the %s guest view, not the original file; download it again to register its file view", meta.ID, id, m.Container)
	}
	if meta.Size != nil && m.Size != *meta.Size {
		return nil, fmt.Errorf("hoard's image %s (manifest %s) is %d bytes, Glance's original is %d: it is not the original file; remove it with hoard image rm %s",
			meta.ID, id, m.Size, *meta.Size, meta.ID)
	}
	if want := glanceChecksums(meta); m.Source.Checksum != "" && len(want) > 0 && !want[strings.ToLower(m.Source.Checksum)] {
		return nil, fmt.Errorf("hoard's image %s (manifest %s) was imported with checksum %s, Glance's image has another; remove it with hoard image rm %s",
			meta.ID, id, m.Source.Checksum, meta.ID)
	}
	x := &export{n: mi.n, img: img, name: meta.ID, mirror: true}
	x.next.Store(-1)
	// Like an open export, a download keeps the image's chunks out of
	// eviction until it is closed.
	mi.n.live.add(m)
	return &mirrorImage{x: x}, nil
}

// mirrorSources label hoard_glance_mirror_served_bytes_total: the read
// path's sources (slot), holes, and the registration stream from Glance.
var mirrorSources = [...]string{"local", "peer", "origin", "zero", "glance_stream"}

const (
	mirrorZero   = 3
	mirrorStream = 4
)

// mirrorServed counts n bytes a mirror download read from source i of
// mirrorSources (nothing for an NBD export).
func (x *export) mirrorServed(i int, n int64) {
	if x.mirror {
		x.n.stats.mirrorBytes[i].Add(n)
	}
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
// export: a download is no boot, so it records no profile; but it holds the
// image's chunks out of eviction (the live set) until Close.
type mirrorImage struct {
	x      *export
	closed sync.Once
}

func (m *mirrorImage) Size() int64 { return m.x.img.m.Size }

func (m *mirrorImage) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.x.img.touch()
	return m.x.ReadAt(ctx, p, off)
}

func (m *mirrorImage) Close() error {
	m.closed.Do(func() { m.x.n.live.remove(m.x.img.m) })
	return nil
}

// imageReadCloser reads an image from its start and closes it.
type imageReadCloser struct {
	io.ReadCloser
	img glancemirror.Image
}

func (r imageReadCloser) Close() error {
	r.ReadCloser.Close()
	return r.img.Close()
}

func (mi *mirrorImages) reader(ctx context.Context, meta glancemirror.Meta, id chunkstore.ID) (io.ReadCloser, error) {
	img, err := mi.open(ctx, meta, id)
	if err != nil {
		return nil, err
	}
	return imageReadCloser{ReadCloser: glancemirror.NewReader(ctx, img), img: img}, nil
}

// Register implements glancemirror.Images.
func (mi *mirrorImages) Register(ctx context.Context, meta glancemirror.Meta) (io.ReadCloser, error) {
	n := mi.n
	mi.mu.Lock()
	_, here := mi.regs[meta.ID] // registering here already (after a registrar failed): join it
	mi.mu.Unlock()
	if n.cl != nil && !here {
		if reg, self := mi.registrar(meta.ID); !self {
			rc, err := mi.viaRegistrar(ctx, meta, reg)
			if err == nil {
				return rc, nil
			}
			if ctx.Err() != nil {
				return nil, err
			}
			n.log.Info("glance mirror: the registrar did not register the image; registering it here", "glance_image", meta.ID, "registrar", reg, "err", err)
		}
	}
	return mi.registerHere(ctx, meta)
}

// registrar returns the node that registers Glance image id for the
// cluster, and whether that is this node.
func (mi *mirrorImages) registrar(id string) (peer.ID, bool) {
	p := mi.n.cl.Peer()
	self := p.ID()
	d := chooseRegistrar(id, self, p.Host().Network().Peers(), mi.n.liveMembers(), p.Bad)
	return d, d == self
}

// chooseRegistrar is the registrar of Glance image id: the rendezvous
// choice over this node, its connected peers and the cluster's members it
// heard a NodeInfo from (so that nodes connected to different peers choose
// the same), but for the peers bad says sent bad bytes.
func chooseRegistrar(id string, self peer.ID, connected, members []peer.ID, bad func(peer.ID) bool) peer.ID {
	seen := map[peer.ID]bool{self: true}
	peers := []peer.ID{self}
	for _, ids := range [][]peer.ID{connected, members} {
		for _, pid := range ids {
			if !seen[pid] && !bad(pid) {
				seen[pid] = true
				peers = append(peers, pid)
			}
		}
	}
	return p2p.Designated(chunkstore.Sum([]byte("hoard glance mirror registrar "+id)), peers)
}

// viaRegistrar asks the registrar to register the image now, registers its
// manifest here and streams the image through the read path.
func (mi *mirrorImages) viaRegistrar(ctx context.Context, meta glancemirror.Meta, reg peer.ID) (io.ReadCloser, error) {
	n := mi.n
	p := n.cl.Peer()
	wait := n.cfg.GlanceRegisterWait
	start := time.Now()
	n.log.Info("glance mirror: asking the registrar to register the image", "glance_image", meta.ID, "registrar", reg)
	m, name, err := p.AskGlanceRegister(ctx, reg, meta.ID, wait, nil)
	if err != nil {
		return nil, err
	}
	if err := mi.adopt(ctx, reg, meta.ID, m, name); err != nil {
		return nil, err
	}
	n.log.Info("glance mirror: the registrar registered the image", "glance_image", meta.ID, "registrar", reg,
		"name", name, "manifest", m, "waited", time.Since(start).Round(time.Millisecond))
	return mi.reader(ctx, meta, m)
}

// adopt registers here, as name, manifest m that peer from holds as Glance
// image id's: name must be id or its file view's.
func (mi *mirrorImages) adopt(ctx context.Context, from peer.ID, id string, m chunkstore.ID, name string) error {
	n := mi.n
	st := n.store
	if name != id && name != fileViewName(id) {
		// p2p.AskGlanceRegister refuses such an answer (and marks the peer
		// bad); never name an image here as a peer says otherwise.
		return fmt.Errorf("the registrar %s answered glance image %s with the image name %q, neither %s nor %s; not registered", from, id, name, id, fileViewName(id))
	}
	if _, err := st.GetManifestBytes(ctx, m); err != nil {
		mctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		enc, err := n.cl.Peer().Manifest(mctx, from, m)
		cancel()
		if err != nil {
			return fmt.Errorf("manifest %s of the registered image from %s: %w", m, from, err)
		}
		dm, err := chunkstore.DecodeManifest(enc)
		if err != nil {
			return fmt.Errorf("manifest %s from %s: %w", m, from, err)
		}
		got, err := st.PutManifest(ctx, dm)
		if err != nil {
			return err
		}
		if got != m {
			return fmt.Errorf("manifest from %s re-encodes to %s, want %s", from, got, m)
		}
	}
	if err := st.SetName(ctx, name, m); err != nil {
		if !errors.Is(err, chunkstore.ErrExists) {
			return err
		}
		// The name is another image's here: the download reads this
		// manifest all the same.
		n.log.Warn("glance mirror: the registered image's name points at another image here", "name", name, "manifest", m, "err", err)
		return nil
	}
	n.advertiseLater(name, m)
	return nil
}

// registerHere registers the image on this node, streaming it to the
// caller as it arrives from Glance; when a registration of it is already
// under way here, it waits for it and reads the registered image.
func (mi *mirrorImages) registerHere(ctx context.Context, meta glancemirror.Meta) (io.ReadCloser, error) {
	r, pr, err := mi.start(ctx, meta, true)
	if err != nil {
		return nil, err
	}
	if pr != nil {
		return &streamCounter{lagPipe: pr, n: &mi.n.stats.mirrorBytes[mirrorStream], verifies: r.verifies}, nil
	}
	select {
	case <-r.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if r.err != nil {
		return nil, r.err
	}
	return mi.reader(ctx, meta, r.manifest)
}

// RegisterGlance registers Glance image id for a peer that asked
// (p2p.GlanceBackend): it finds the image's file bytes here, or joins or
// starts this node's registration, and waits for it.
func (mi *mirrorImages) RegisterGlance(ctx context.Context, from peer.ID, id string, progress func(done, total int64)) (chunkstore.ID, string, error) {
	if m, name, err := mi.localFile(ctx, id); err == nil {
		return m, name, nil
	}
	mi.n.log.Info("glance mirror: a peer asks this node to register the image", "glance_image", id, "peer_id", from)
	r, _, err := mi.start(ctx, glancemirror.Meta{ID: id}, false)
	if err != nil {
		return chunkstore.ID{}, "", err
	}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-r.done:
			return r.manifest, r.name, r.err
		case <-ctx.Done():
			return chunkstore.ID{}, "", ctx.Err()
		case <-tick.C:
			progress(r.read.Load(), r.size.Load())
		}
	}
}

// RegisterGlance implements p2p.GlanceBackend.
func (b backend) RegisterGlance(ctx context.Context, from peer.ID, id string, progress func(done, total int64)) (chunkstore.ID, string, error) {
	if err := b.wait(ctx); err != nil {
		return chunkstore.ID{}, "", err
	}
	return b.n.mirror.RegisterGlance(ctx, from, id, progress)
}

// start joins this node's registration of meta.ID under way, or starts one:
// the image streamed from Glance with hoard's credentials into the store,
// as its file bytes. A registration started here with tee set also streams
// the bytes to the returned reader (nil when the registration was joined):
// a reader more than MaxClientLag behind fails, the registration goes on.
func (mi *mirrorImages) start(ctx context.Context, meta glancemirror.Meta, tee bool) (*mirrorReg, *lagPipe, error) {
	n := mi.n
	mi.mu.Lock()
	if r := mi.regs[meta.ID]; r != nil {
		mi.mu.Unlock()
		return r, nil, nil
	}
	r := &mirrorReg{done: make(chan struct{})}
	mi.regs[meta.ID] = r
	mi.mu.Unlock()
	finish := func(m chunkstore.ID, name string, err error) {
		mi.mu.Lock()
		delete(mi.regs, meta.ID)
		mi.mu.Unlock()
		r.manifest, r.name, r.err = m, name, err
		close(r.done)
	}
	fail := func(err error) (*mirrorReg, *lagPipe, error) {
		finish(chunkstore.ID{}, "", err)
		return nil, nil, err
	}
	if n.cfg.Origin.GlanceURL == "" {
		return fail(fmt.Errorf("glance image %s: this node has no Glance endpoint to register it from; set origin.glance.url", meta.ID))
	}
	src, err := origin.Open(ctx, "glance://"+meta.ID, n.cfg.Origin)
	if err != nil {
		return fail(fmt.Errorf("open glance://%s with hoard's Glance credentials (origin.glance.token, origin.glance.headers): %w", meta.ID, err))
	}
	if meta.Size != nil && src.Size() != *meta.Size {
		src.Close()
		return fail(fmt.Errorf("glance image %s: %d bytes to hoard's credentials, %d to the caller's", meta.ID, src.Size(), *meta.Size))
	}
	name := meta.ID
	if f, ok := src.(origin.Formatter); ok && origin.ContainerOf(f.Format()) != "" {
		name = fileViewName(meta.ID)
	} else if _, err := n.store.Resolve(ctx, meta.ID); err == nil {
		name = fileViewName(meta.ID) // the ID names the guest view
	}
	r.size.Store(src.Size())
	if sum := strings.ToLower(src.Ref().Checksum); sum != "" && glanceChecksums(meta)[sum] {
		r.verifies = true
	}
	var pw *lagPipe
	if tee {
		pw = newLagPipe(MaxClientLag)
	}
	ts := &teeSource{Source: src, w: pw}
	runCtx := n.runCtx
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		defer src.Close()
		start := time.Now()
		// The file bytes: a qcow2 stays a file, not its guest view.
		res, err := importer.Import(runCtx, n.store, ts, importer.Options{Name: name, Format: importer.FormatRaw,
			Progress: func(done, _ int64) { r.read.Store(done) }})
		var m chunkstore.ID
		if errors.Is(err, chunkstore.ErrExists) {
			// Registered meanwhile (by the catalog): the stream was read
			// and verified to its end all the same.
			m, err = n.store.Resolve(runCtx, name)
		} else if err == nil {
			m = res.Manifest
			n.advertiseLater(res.Name, res.Manifest)
			n.announce(runCtx, res.Manifest)
			n.log.Info("glance mirror: image registered", "glance_image", meta.ID, "name", name, "manifest", res.Manifest, "size", res.Size,
				"new_chunks", res.NewChunks, "took", time.Since(start).Round(time.Millisecond))
		}
		if err != nil {
			n.log.Warn("glance mirror: registering the image failed; nothing was registered", "glance_image", meta.ID, "err", err)
			err = fmt.Errorf("register glance image %s: %w", meta.ID, err)
		}
		if pw != nil {
			pw.CloseWithError(err)
		}
		finish(m, name, err)
	}()
	return r, pw, nil
}

// MaxClientLag bounds how far the client of a registration's stream may
// fall behind the stream from Glance: beyond it, its download fails and the
// registration goes on without it.
const MaxClientLag = 8 << 20

// errClientLag is what a client that fell MaxClientLag behind reads.
var errClientLag = fmt.Errorf("the client fell more than %d MiB behind the image's registration stream from Glance, which goes on without it; download the image again (it is served from hoard once registered)", MaxClientLag>>20)

// lagPipe is the registration stream to its client: Write never blocks (the
// import must not wait for a client); it buffers up to max bytes the client
// has not read yet, and fails the client's reads with errClientLag when it
// falls further behind.
type lagPipe struct {
	mu     sync.Mutex
	cond   *sync.Cond
	buf    []byte
	max    int
	err    error // the writer's end: io.EOF, its error, or errClientLag
	closed bool  // the reader closed its end
}

func newLagPipe(limit int) *lagPipe {
	p := &lagPipe{max: limit}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// Write buffers b for the reader; it fails once the reader is gone or fell
// too far behind (the caller then stops writing).
func (p *lagPipe) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed:
		return 0, io.ErrClosedPipe
	case p.err != nil:
		return 0, p.err
	case len(p.buf)+len(b) > p.max:
		p.err, p.buf = errClientLag, nil
		p.cond.Broadcast()
		return 0, p.err
	}
	p.buf = append(p.buf, b...)
	p.cond.Broadcast()
	return len(b), nil
}

// CloseWithError ends the stream: the reader reads what is buffered, then
// err (io.EOF when nil).
func (p *lagPipe) CloseWithError(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil {
		err = io.EOF
	}
	if p.err == nil {
		p.err = err
	}
	p.cond.Broadcast()
}

func (p *lagPipe) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.buf) == 0 && p.err == nil && !p.closed {
		p.cond.Wait()
	}
	if p.closed {
		return 0, io.ErrClosedPipe
	}
	if errors.Is(p.err, errClientLag) || len(p.buf) == 0 {
		return 0, p.err
	}
	n := copy(b, p.buf)
	p.buf = p.buf[n:]
	if len(p.buf) == 0 {
		p.buf = nil // let the drained buffer go
	}
	return n, nil
}

// Close ends the reader's end: the writer's next Write fails.
func (p *lagPipe) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed, p.buf = true, nil
	p.cond.Broadcast()
	return nil
}

// streamCounter counts the bytes of a registration stream read by a client.
type streamCounter struct {
	*lagPipe
	n        *atomic.Int64
	verifies bool
}

// Verifies implements glancemirror.Verifying: the registration's origin
// stream fails unless the bytes match the checksum it announced, and that
// is one of the caller's Glance record.
func (c *streamCounter) Verifies() bool { return c.verifies }

func (c *streamCounter) Read(p []byte) (int, error) {
	k, err := c.lagPipe.Read(p)
	c.n.Add(int64(k))
	return k, err
}

// teeSource is an origin.Source whose stream also goes to w, as long as w
// takes it (a client that went away or fell behind stops the copy, not the
// import).
type teeSource struct {
	origin.Source
	w *lagPipe
}

func (t *teeSource) Format() string {
	if f, ok := t.Source.(origin.Formatter); ok {
		return f.Format()
	}
	return ""
}

func (t *teeSource) Stream(ctx context.Context) (io.ReadCloser, error) {
	rc, err := t.Source.Stream(ctx)
	if err != nil || t.w == nil {
		return rc, err
	}
	return &teeReader{rc: rc, w: t.w}, nil
}

type teeReader struct {
	rc      io.ReadCloser
	w       *lagPipe
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
	h, err := glancemirror.New(glancemirror.Config{GlanceURL: n.cfg.Origin.GlanceURL, Images: n.mirror,
		MaxDownloads: n.cfg.GlanceMaxDownloads, WriteTimeout: n.cfg.GlanceWriteTimeout,
		Log: n.baseLog.With("component", "glancemirror"), Registerer: n.reg})
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
		if err := hs.Shutdown(sctx); err != nil {
			// Downloads still under way (a client that stopped reading):
			// cut them, so that Run does not wait for them.
			n.log.Warn("glance mirror: downloads still under way after 5s of shutdown; closing their connections", "err", err)
			return hs.Close()
		}
		return nil
	})
	n.log.Info("serving the Glance mirror", "addr", ln.Addr().String(), "glance", origin.Redact(n.cfg.Origin.GlanceURL),
		"nova_conf", "[glance] endpoint_override = http://"+ln.Addr().String())
	return nil
}
