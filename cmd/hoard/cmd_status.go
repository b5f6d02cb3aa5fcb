package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/spf13/cobra"
)

func newStatusCommand(g *globalOptions) *cobra.Command {
	var jsonOut bool
	var wait time.Duration
	c := &cobra.Command{
		Use:   "status",
		Short: "Show a running daemon's store usage, read counters and open exports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			s, err := g.statusWait(ctx, wait)
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(s)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintf(tw, "data dir\t%s\n", s.DataDir)
			if s.NBDSocket != "" {
				fmt.Fprintf(tw, "nbd socket\t%s\n", s.NBDSocket)
			}
			if s.NBDListen != "" {
				fmt.Fprintf(tw, "nbd tcp\t%s\n", s.NBDListen)
			}
			quota := "unlimited"
			if s.Quota > 0 {
				quota = formatSize(s.Quota)
			}
			fmt.Fprintf(tw, "store\t%d chunks, %s stored (%s raw), quota %s\n", s.Store.Chunks, formatSize(s.Store.StoredBytes), formatSize(s.Store.RawBytes), quota)
			fmt.Fprintf(tw, "images\t%d\n", s.Images)
			if h := s.Hot; h.MaxBytes > 0 {
				fmt.Fprintf(tw, "hot tier\t%s of %s, %d images; %d reads served, %d corrupt blocks caught, %d evictions\n",
					formatSize(h.Bytes), formatSize(h.MaxBytes), h.Images, h.Hits, h.Corrupt, h.Evictions)
			} else {
				fmt.Fprintf(tw, "hot tier\toff (cache.hot 0)\n")
			}
			if c := s.Cluster; c != nil {
				fmt.Fprintf(tw, "peer id\t%s\n", c.PeerID)
				for _, a := range c.Addrs {
					fmt.Fprintf(tw, "  addr\t%s\n", a)
				}
				fmt.Fprintf(tw, "peers\t%d known, %d connected; %d keys advertised\n", c.Peers, c.ConnectedPeers, c.Provided)
			} else {
				fmt.Fprintf(tw, "cluster\toff (no swarm key; see hoard cluster keygen)\n")
			}
			if h := s.Hoard; h != nil {
				if h.Budget == 0 {
					fmt.Fprintf(tw, "hoarding	off (hoard.budget 0)\n")
				} else {
					var ws, here int64
					whole := 0
					for _, im := range h.Images {
						ws += im.WorkingSetBytes
						here += min(im.LocalBytes, im.WorkingSetBytes)
						if im.WorkingSetBytes > 0 && im.LocalBytes >= im.WorkingSetBytes {
							whole++
						}
					}
					state := "idle"
					switch {
					case h.Yielding:
						state = "yielding to VM reads"
					case h.Running:
						state = "fetching"
					}
					fmt.Fprintf(tw, "hoarding	%s: working sets %s of %s here (%d of %d images whole), budget %s; hoarded %s from peers, %s from origins\n",
						state, formatSize(here), formatSize(ws), whole, len(h.Images), formatSize(h.Budget),
						formatSize(h.BySource["peer"]), formatSize(h.BySource["origin"]))
				}
			}
			k := s.Counters
			fmt.Fprintf(tw, "read from store\t%s (%d chunks)\n", formatSize(k.ReadBytes["local"]), k.ReadChunks["local"])
			fmt.Fprintf(tw, "read from peers\t%s (%d chunks)\n", formatSize(k.ReadBytes["peer"]), k.ReadChunks["peer"])
			fmt.Fprintf(tw, "read from origin\t%s (%d chunks)\n", formatSize(k.ReadBytes["origin"]), k.ReadChunks["origin"])
			fmt.Fprintf(tw, "origin bytes\t%s fetched, %d errors\n", formatSize(k.OriginBytes), k.OriginErrors)
			fmt.Fprintf(tw, "prefetched\t%d chunks readahead, %d from profiles, %d hoarded\n", k.PrefetchChunks["readahead"], k.PrefetchChunks["profile"], k.PrefetchChunks["hoard"])
			fmt.Fprintf(tw, "exports open\t%d\n", k.ExportsOpen)
			for _, e := range s.Exports {
				fmt.Fprintf(tw, "  %s\t%d open (%s)\n", strings.Join(e.Names, ", "), e.Open, e.Manifest)
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	c.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the daemon to start answering (e.g. 30s), for scripts that start one")
	return c
}

// statusWait asks the daemon for its status, retrying for up to wait while it
// is not answering yet (starting up, or its data dir not written yet).
func (g *globalOptions) statusWait(ctx context.Context, wait time.Duration) (*api.Status, error) {
	deadline := time.Now().Add(wait)
	for {
		cl, err := g.daemon(ctx)
		if err == nil {
			var s api.Status
			if s, err = cl.Status(ctx); err == nil {
				return &s, nil
			}
		}
		if time.Now().After(deadline) {
			if wait > 0 {
				return nil, fmt.Errorf("no daemon answered within %v: %w", wait, err)
			}
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// daemonAddr is where the daemon's API should be: HOARD_API (config api), the
// address a daemon on this data dir wrote, or api.listen.
func (g *globalOptions) daemonAddr() string {
	if a := g.v.GetString("api"); a != "" {
		return a
	}
	if dir := g.v.GetString("data_dir"); dir != "" {
		if b, err := os.ReadFile(filepath.Join(dir, node.APIAddrFile)); err == nil {
			return strings.TrimSpace(string(b))
		}
	}
	if a := g.v.GetString("api.listen"); a != "" && a != "-" {
		return a
	}
	return node.DefaultAPIListen
}

// daemon returns a client for a running daemon, or an error saying how to start one.
func (g *globalOptions) daemon(ctx context.Context) (*api.Client, error) {
	addr := g.daemonAddr()
	token, err := g.apiToken(addr)
	if err != nil {
		return nil, err
	}
	cl := api.NewClient(addr, token)
	if err := cl.Ping(ctx, 2*time.Second); err != nil {
		return nil, fmt.Errorf("no hoard daemon answers at %s: start one with hoard daemon, or set HOARD_API to its api.listen address (%v)", addr, err)
	}
	return cl, nil
}

// apiToken is the token for the daemon at addr: api.token (HOARD_API_TOKEN)
// when set, else what the daemon on the data dir keeps in
// DATA_DIR/api.token, but only if addr is that daemon (HOARD_API unset, or
// naming the address the daemon wrote): the token is root-equivalent and
// must not go to whatever HOARD_API points at. Without a token, requests go
// out bare and the daemon's 401 says where the token is.
func (g *globalOptions) apiToken(addr string) (string, error) {
	if t := g.v.GetString("api.token"); t != "" {
		return t, nil
	}
	dir := g.v.GetString("data_dir")
	if dir == "" {
		return "", nil
	}
	if a := g.v.GetString("api"); a != "" {
		b, err := os.ReadFile(filepath.Join(dir, node.APIAddrFile))
		if err != nil || strings.TrimSpace(string(b)) != strings.TrimPrefix(strings.TrimRight(a, "/"), "http://") {
			return "", nil
		}
	}
	t, err := node.ReadAPIToken(dir)
	if err != nil {
		return "", nil
	}
	// Only to a socket of the token's owner (the daemon's user): see
	// checkAPIOwner.
	uid, err := fileOwner(filepath.Join(dir, node.APITokenFile))
	if err != nil {
		return "", nil
	}
	if err := checkAPIOwner(addr, uid); err != nil {
		return "", fmt.Errorf("not sending the API token of %s to %s: %w", dir, addr, err)
	}
	return t, nil
}

// backend returns a client when a daemon runs on the data dir (it wrote its
// API address there and answers) or HOARD_API points at one; otherwise it
// opens the store, which must exist: a command that only reads or removes
// must not leave an empty store in whatever directory it ran in. Exactly
// one of the results is not nil.
func (g *globalOptions) backend(ctx context.Context) (*chunkstore.Store, *api.Client, error) {
	return g.backendFor(ctx, false)
}

func (g *globalOptions) backendFor(ctx context.Context, create bool) (*chunkstore.Store, *api.Client, error) {
	if g.v.GetString("api") != "" {
		cl, err := g.daemon(ctx)
		return nil, cl, err
	}
	if dir := g.v.GetString("data_dir"); dir != "" {
		if _, err := os.Stat(filepath.Join(dir, node.APIAddrFile)); err == nil {
			if cl, err := g.daemon(ctx); err == nil {
				return nil, cl, nil
			}
		}
	}
	if !create {
		if err := g.storeExists(); err != nil {
			return nil, nil, err
		}
	}
	st, err := g.openStore()
	if err == nil {
		return st, nil, nil
	}
	if !errors.Is(err, syscall.EAGAIN) && !strings.Contains(err.Error(), "already running") {
		return nil, nil, err
	}
	// Locked by a daemon that did not say where its API is: try api.listen.
	cl, derr := g.daemon(ctx)
	if derr != nil {
		return nil, nil, fmt.Errorf("%w: another process holds the store (a hoard daemon?), and %w", err, derr)
	}
	return nil, cl, nil
}
