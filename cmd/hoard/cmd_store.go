package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/spf13/cobra"
)

func newStoreCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{Use: "store", Short: "Chunk store statistics, verification and garbage collection"}
	var statsJSON, verifyJSON, gcJSON bool
	stats := &cobra.Command{
		Use:   "stats",
		Short: "Show stored, logical and non-zero bytes, dedup and compression ratios",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := g.images(cmd.Context(), false)
			if err != nil {
				return err
			}
			defer svc.Close()
			s, err := svc.Stats(cmd.Context())
			if err != nil {
				return err
			}
			if statsJSON {
				return printJSON(s)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			quota := "unlimited"
			if s.Quota > 0 {
				quota = fmt.Sprintf("%s (%.1f%% used)", formatSize(s.Quota), 100*float64(s.StoredBytes)/float64(s.Quota))
			}
			fmt.Fprintf(tw, "images\t%d\nlogical bytes\t%s\nnon-zero bytes\t%s\ncached non-zero bytes\t%s\n",
				s.Images, formatSize(s.LogicalBytes), formatSize(s.NonZeroBytes), formatSize(s.PresentBytes))
			fmt.Fprintf(tw, "unique chunks\t%d\nunique raw bytes\t%s\nstored bytes\t%s\nquota\t%s\n",
				s.Chunks, formatSize(s.RawBytes), formatSize(s.StoredBytes), quota)
			fmt.Fprintf(tw, "dedup ratio\t%.2fx\ncompression ratio\t%.2fx\n", s.DedupRatio, s.Compression)
			if s.StoredBytes > 0 {
				fmt.Fprintf(tw, "total saving\t%.2fx (cached non-zero bytes / stored bytes)\n", float64(s.PresentBytes)/float64(s.StoredBytes))
			}
			return tw.Flush()
		},
	}
	stats.Flags().BoolVar(&statsJSON, "json", false, "print as JSON")
	verify := &cobra.Command{
		Use:   "verify",
		Short: "Read every chunk and check it against its ID; corrupt chunks are dropped",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := g.images(cmd.Context(), false)
			if err != nil {
				return err
			}
			defer svc.Close()
			if svc.Remote() {
				fmt.Fprintln(os.Stderr, "verifying through the running daemon...")
			}
			p := newProgress("verify", "chunks")
			res, err := svc.Verify(cmd.Context(), p.Report)
			p.Done()
			if err != nil {
				return err
			}
			if verifyJSON {
				if err := printJSON(res); err != nil {
					return err
				}
			} else {
				fmt.Printf("checked %d chunks (%s), %d corrupt (dropped), %d bad manifests, %d chunks not cached (fetched on demand)\n",
					res.Chunks, formatSize(res.Bytes), len(res.Corrupt), res.BadMeta, res.Missing)
				for _, id := range res.Corrupt {
					fmt.Printf("  corrupt: %s\n", id)
				}
				for _, id := range res.Unreadable {
					fmt.Printf("  unreadable (kept): %s\n", id)
				}
			}
			if len(res.Unreadable) > 0 && !verifyJSON {
				fmt.Fprintf(os.Stderr, "hoard: %d chunks could not be read from disk (I/O errors); they were kept. Check the disk (dmesg, smartctl), then run hoard store verify again.\n", len(res.Unreadable))
			}
			if len(res.Corrupt) > 0 || res.BadMeta > 0 || len(res.Unreadable) > 0 {
				if !verifyJSON {
					fmt.Fprintln(os.Stderr, "hoard: the store had damage; corrupt chunks were dropped and will be fetched again from peers or the origin. Check the disk (dmesg, smartctl).")
				}
				return errSilent
			}
			return nil
		},
	}
	verify.Flags().BoolVar(&verifyJSON, "json", false, "print as JSON")
	gc := &cobra.Command{
		Use:   "gc",
		Short: "Delete chunks no image references or pins, and leftover files",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			svc, err := g.images(cmd.Context(), false)
			if err != nil {
				return err
			}
			defer svc.Close()
			p := newProgress("gc", "")
			res, err := svc.GC(cmd.Context(), p.Report)
			p.Done()
			if err != nil {
				return err
			}
			if gcJSON {
				return printJSON(res)
			}
			fmt.Printf("removed %d unreferenced chunks (%s); compaction gave %s back to the disk\n", res.Chunks, formatSize(res.StoredBytes), formatSize(res.ReclaimedDiskBytes))
			return nil
		},
	}
	gc.Flags().BoolVar(&gcJSON, "json", false, "print as JSON")
	c.AddCommand(stats, verify, gc)
	return c
}

// storeExists returns an error saying what to do when the configured data
// dir holds no chunk store (and no daemon was found to ask instead).
func (g *globalOptions) storeExists() error {
	dir := g.v.GetString("data_dir")
	if dir == "" {
		return errors.New("no data dir: set --data-dir or HOARD_DATA_DIR")
	}
	fi, err := os.Stat(filepath.Join(dir, "store"))
	if err == nil && fi.IsDir() {
		return nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("data dir %s: %w", dir, err)
	}
	abs, aerr := filepath.Abs(dir)
	if aerr != nil {
		abs = dir
	}
	return fmt.Errorf("no hoard data dir at %s (no daemon answers and there is no store there); start the daemon with hoard daemon --data-dir %s, "+
		"or pass --data-dir (HOARD_DATA_DIR) of an existing one, or set HOARD_API to a running daemon", abs, abs)
}

// openStore opens the chunk store in the configured data dir, creating it
// when needed (see storeExists).
func (g *globalOptions) openStore() (*chunkstore.Store, error) {
	dir := g.v.GetString("data_dir")
	if dir == "" {
		return nil, errors.New("no data dir: set --data-dir or HOARD_DATA_DIR")
	}
	quota, err := parseSize(g.v.GetString("store.quota"))
	if err != nil {
		return nil, fmt.Errorf("store.quota: %w", err)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	return chunkstore.Open(dir+"/store", chunkstore.WithQuota(quota), chunkstore.WithCodec(g.v.GetString("store.compression")),
		chunkstore.WithLogger(g.logger()))
}

func (g *globalOptions) originConfig() origin.Config {
	return origin.Config{
		GlanceURL:     g.v.GetString("origin.glance.url"),
		GlanceToken:   g.v.GetString("origin.glance.token"),
		GlanceHeaders: parseHeaders(g.v.GetString("origin.glance.headers")),
		Log:           g.logger(),
		// The daemon's node.Config adds the same file; an image added here
		// is then readable lazily by a daemon on this data dir.
		Credentials: origin.NewCredentials(filepath.Join(g.v.GetString("data_dir"), node.OriginCredentialsFile)),
	}
}

// parseHeaders reads "Name=value,Name2=value2" (config origin.glance.headers),
// extra headers for a Glance without keystone (X-Roles, X-Tenant-Id).
func parseHeaders(s string) map[string]string {
	if s == "" {
		return nil
	}
	h := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if ok && strings.TrimSpace(k) != "" {
			h[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return h
}
