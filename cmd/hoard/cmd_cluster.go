package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hoardvm/hoard/p2p"
	"github.com/spf13/cobra"
)

func newClusterCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "cluster",
		Short: "Set up the cluster (the private peer-to-peer network of hoard nodes)",
	}
	c.AddCommand(newClusterKeygenCommand(g), newClusterAddrCommand(g))
	return c
}

func newClusterAddrCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "addr",
		Short: "Print the running daemon's cluster addresses, one per line, to give other nodes as p2p.bootstrap",
		Long: `Prints the multiaddrs (ending in /p2p/<peer ID>) at which the running daemon
accepts cluster connections, one per line. Give one of them to other nodes as
p2p.bootstrap (--p2p-bootstrap). Fails when the node is not in a cluster.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := g.statusWait(cmd.Context(), 0)
			if err != nil {
				return err
			}
			if s.Cluster == nil || len(s.Cluster.Addrs) == 0 {
				return fmt.Errorf("this node is not in a cluster (no swarm key): create one with hoard cluster keygen, then restart the daemon")
			}
			for _, a := range s.Cluster.Addrs {
				fmt.Println(a)
			}
			return nil
		},
	}
}

func newClusterKeygenCommand(g *globalOptions) *cobra.Command {
	var force bool
	c := &cobra.Command{
		Use:   "keygen [PATH]",
		Short: "Write a new cluster swarm key (default <data_dir>/swarm.key)",
		Long: `Writes a new random pre-shared key for the cluster (the standard libp2p
swarm.key format), mode 0600. Every node of the cluster needs the same key at
p2p.swarm_key_file (default <data_dir>/swarm.key): copy this file to each one.
A node without it cannot connect to the others.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := g.swarmKeyFile()
			if len(args) == 1 {
				path = args[0]
			}
			if path == "" {
				return errors.New("no path: give one, or set --data-dir")
			}
			return runClusterKeygen(path, force)
		},
	}
	c.Flags().BoolVar(&force, "force", false, "overwrite an existing key (nodes with the old key can no longer join)")
	return c
}

func runClusterKeygen(path string, force bool) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if force {
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s already exists; keep it (every node needs the same key), or pass --force to replace it", path)
	}
	if err != nil {
		return err
	}
	if _, err := f.Write(p2p.GenerateSwarmKey()); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Printf("wrote swarm key %s; copy it to every node (p2p.swarm_key_file) and keep it secret\n", path)
	return nil
}

// swarmKeyFile is p2p.swarm_key_file, default <data_dir>/swarm.key.
func (g *globalOptions) swarmKeyFile() string {
	if p := g.v.GetString("p2p.swarm_key_file"); p != "" {
		return p
	}
	if dir := g.v.GetString("data_dir"); dir != "" {
		return filepath.Join(dir, "swarm.key")
	}
	return ""
}

func newPeersCommand(g *globalOptions) *cobra.Command {
	var jsonOut bool
	c := &cobra.Command{
		Use:   "peers",
		Short: "List a running daemon's peers (connected and in its routing table)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cl, err := g.daemon(ctx)
			if err != nil {
				return err
			}
			peers, err := cl.Peers(ctx)
			if err != nil {
				return err
			}
			if jsonOut {
				if peers == nil {
					peers = []p2p.PeerInfo{}
				}
				return printJSON(peers)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "PEER\tCONNECTED\tLATENCY\tADDRS")
			for _, p := range peers {
				state := "no"
				if p.Connected {
					state = "yes"
				}
				if p.Bad {
					state += " (bad)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%.1f ms\t%s\n", p.ID, state, p.LatencyMS, strings.Join(p.Addrs, " "))
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	return c
}

func newImagePullCommand(g *globalOptions) *cobra.Command {
	var jsonOut bool
	c := &cobra.Command{
		Use:   "pull NAME",
		Short: "Register an image another node of the cluster has (by name, Glance ID or manifest CID), lazily",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cl, err := g.daemon(ctx)
			if err != nil {
				return err
			}
			p := newProgress("pull "+args[0], "")
			info, err := cl.PullImageProgress(ctx, args[0], p.Report)
			p.Done()
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(info)
			}
			fmt.Printf("%s: manifest %s, %s, %d chunks (%d here); chunks arrive from peers on demand\n",
				info.Name, info.Manifest, formatSize(info.Size), info.Chunks, info.Present)
			return nil
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	return c
}

func newImagePrefetchCommand(g *globalOptions) *cobra.Command {
	var jsonOut, full, cluster bool
	c := &cobra.Command{
		Use:   "prefetch NAME",
		Short: "Fetch an image's boot working set (or, with --full, all of it) now, and pin it",
		Long: "Fetch an image's boot working set as the cluster knows it (or, with --full, every chunk) into this node's store\n" +
			"now, from peers first and from the origin only through the cluster's designated fetcher, and pin it so\n" +
			"that it is never evicted (hoard image rm unpins it). The daemon's hoarder does this for every image on\n" +
			"its own within hoard.budget; prefetch is for an image that must be here before it is booted.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cl, err := g.daemon(ctx)
			if err != nil {
				return err
			}
			p := newProgress("prefetch "+args[0], "bytes")
			res, err := cl.Prefetch(ctx, args[0], full, cluster, p.Report)
			p.Done()
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(res)
			}
			what := "working set"
			if full {
				what = "image"
			}
			fmt.Printf("%s: %s of %d chunks (%s) here and pinned: %d were here, %d fetched (%s from peers, %s from the origin) in %s\n",
				args[0], what, res.Chunks, formatSize(res.Bytes), res.Local, res.Fetched,
				formatSize(res.BySource["peer"]), formatSize(res.BySource["origin"]), res.Duration.Round(time.Millisecond))
			if cluster {
				fmt.Printf("asked every node of the cluster to do the same (hoard status on each shows it)\n")
			}
			if res.Chunks == 0 && !full {
				fmt.Printf("the image has no boot profile yet: boot it once anywhere in the cluster, or use --full\n")
			}
			return nil
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	c.Flags().BoolVar(&full, "full", false, "fetch every chunk of the image, not only its boot working set")
	c.Flags().BoolVar(&cluster, "cluster", false, "do it on every node of the cluster (a node that joins later does it when it learns the image)")
	return c
}

// splitList splits list values given as repeated flags, commas or spaces.
func splitList(in []string) []string {
	var out []string
	for _, s := range in {
		out = append(out, strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' })...)
	}
	return out
}

// parseRate parses a bytes-per-second limit: "100MiB", "100MiB/s",
// "100MiB per second"; empty, 0 or "unlimited": none.
func parseRate(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" || strings.EqualFold(t, "unlimited") {
		return 0, nil
	}
	for _, suf := range []string{" per second", "/s", "ps"} {
		if strings.HasSuffix(strings.ToLower(t), suf) {
			t = strings.TrimSpace(t[:len(t)-len(suf)])
			break
		}
	}
	return parseSize(t)
}
