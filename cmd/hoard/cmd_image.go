package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/spf13/cobra"
)

func newImageCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "image",
		Short: "Add, list, inspect and remove images",
	}
	c.AddCommand(newImageAddCommand(g), newImageLsCommand(g), newImageInspectCommand(g), newImageRmCommand(g), newImageProfileCommand(g), newImagePullCommand(g), newImagePrefetchCommand(g))
	return c
}

func newImageAddCommand(g *globalOptions) *cobra.Command {
	var name, chunking, format string
	var lazy, noPin, jsonOut bool
	c := &cobra.Command{
		Use:   "add SOURCE",
		Short: "Import an image from a file, an http(s):// URL or glance://IMAGE-ID",
		Long: `Streams SOURCE once: cuts it into content-defined chunks, hashes,
compresses and stores the new ones, and registers the image under --name.
SOURCE is a path, an http(s):// URL (Range support needed for --lazy), or
glance://IMAGE-ID (set origin.glance.url / HOARD_ORIGIN_GLANCE_URL and, with
keystone, origin.glance.token / HOARD_ORIGIN_GLANCE_TOKEN).

With --format auto (the default), a qcow2 image (detected by its content, or
from Glance's disk_format) is imported by its guest content and exported raw,
so that images of one system deduplicate whatever their container; a lazy
add reads its guest ranges through the qcow2 reader over the origin. A qcow2
with a backing file, an encrypted or corrupt one, or another container
(vmdk, vhdx, vdi, vpc) is refused with what to do. --format raw imports the
source's bytes as they are (a qcow2 is then exported as a qcow2 file).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runImageAdd(cmd.Context(), g, args[0], name, chunking, format, lazy, !noPin, jsonOut)
		},
	}
	f := c.Flags()
	f.StringVar(&name, "name", "", "name to register the image under (default: the Glance ID, or the file name)")
	f.StringVar(&chunking, "chunking", "cdc", "chunking: cdc (content-defined, 64 KiB average) or fixed (64 KiB)")
	f.StringVar(&format, "format", importer.FormatAuto, "auto (a qcow2 is imported by its guest content, exported raw) or raw (the source's bytes as they are)")
	f.BoolVar(&lazy, "lazy", false, "register the manifest only; chunks are fetched from the origin on demand")
	f.BoolVar(&noPin, "no-pin", false, "let the image's chunks be evicted under quota pressure")
	f.BoolVar(&jsonOut, "json", false, "print the summary as JSON")
	return c
}

func runImageAdd(ctx context.Context, g *globalOptions, source, name, chunking, format string, lazy, pin, jsonOut bool) error {
	if _, err := chunkstore.ParseChunking(chunking); err != nil {
		return err
	}
	if _, err := importer.ParseFormat(format); err != nil {
		return err
	}
	svc, err := g.images(ctx, true)
	if err != nil {
		return err
	}
	defer svc.Close()
	req := api.ImportRequest{Source: source, Name: name, Chunking: chunking, Lazy: lazy, Pin: pin, Format: format}
	if svc.Remote() {
		req.Source = absSource(source)
		if !jsonOut {
			fmt.Fprintf(os.Stderr, "importing %s through the running daemon\n", origin.Redact(req.Source))
		}
	}
	label := name
	if label == "" {
		label = local.DefaultName(origin.Ref{Location: origin.Redact(source)})
	}
	// Interrupting the command cancels the import, here or in the daemon.
	p := newProgress("import "+label, "bytes")
	res, err := svc.Add(ctx, req, p.Report)
	p.Done()
	if err != nil {
		return err
	}
	return printImportResult(res, jsonOut)
}

// absSource makes a relative file path absolute (the daemon has another working directory).
func absSource(source string) string {
	if strings.Contains(source, "://") || filepath.IsAbs(source) {
		return source
	}
	if abs, err := filepath.Abs(source); err == nil {
		return abs
	}
	return source
}

func printImportResult(res *importer.Result, jsonOut bool) error {
	if jsonOut {
		return printJSON(res)
	}
	name, lazy := res.Name, res.Lazy
	rate := float64(res.Size) / res.Duration.Seconds()
	fmt.Printf("image %s imported in %s (%s/s)\n", name, res.Duration.Round(time.Millisecond), formatSize(int64(rate)))
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  manifest\t%s\n", res.Manifest)
	if res.Container != "" {
		fmt.Fprintf(tw, "  format\t%s (guest content of a %s)\n", res.Format, res.Container)
	} else {
		fmt.Fprintf(tw, "  format\t%s\n", res.Format)
	}
	fmt.Fprintf(tw, "  size\t%s (%d bytes)\n", formatSize(res.Size), res.Size)
	fmt.Fprintf(tw, "  non-zero bytes\t%s\n", formatSize(res.NonZeroBytes))
	fmt.Fprintf(tw, "  chunks\t%d (%d unique)\n", res.Chunks, res.UniqueChunks)
	if lazy {
		fmt.Fprintf(tw, "  stored\tnothing yet (lazy: chunks arrive on first read)\n")
	} else {
		fmt.Fprintf(tw, "  new unique chunks\t%d\n", res.NewChunks)
		fmt.Fprintf(tw, "  stored bytes\t%s (new)\n", formatSize(res.NewStoredBytes))
		fmt.Fprintf(tw, "  compression ratio\t%.2fx (new chunks)\n", res.CompressionRatio)
	}
	fmt.Fprintf(tw, "  dedup ratio\t%.2fx (within the image)\n", res.DedupRatio)
	return tw.Flush()
}

type imageRow = api.ImageInfo

// listImages lists images from the store, or through the daemon that holds it.
func (g *globalOptions) listImages(ctx context.Context) ([]imageRow, error) {
	svc, err := g.images(ctx, false)
	if err != nil {
		return nil, err
	}
	defer svc.Close()
	return svc.List(ctx)
}

// inspectImage describes one image, from the store or through the daemon.
func (g *globalOptions) inspectImage(ctx context.Context, name string, entries bool) (api.ImageDetail, error) {
	svc, err := g.images(ctx, false)
	if err != nil {
		return api.ImageDetail{}, err
	}
	defer svc.Close()
	return svc.Inspect(ctx, name, entries)
}

func newImageProfileCommand(g *globalOptions) *cobra.Command {
	var jsonOut, all bool
	c := &cobra.Command{
		Use:   "profile NAME",
		Short: "Show an image's boot profile: the chunks its boots read, in first-read order",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			svc, err := g.images(ctx, false)
			if err != nil {
				return err
			}
			p, err := svc.Profile(ctx, args[0])
			svc.Close()
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(p)
			}
			if p.Boots == 0 {
				fmt.Printf("image %s has no boot profile yet: boot a VM from it (hoard vm overlay %s vm.qcow2)\n", p.Name, p.Name)
				return nil
			}
			fmt.Printf("image %s (%s): %d %s recorded, %d chunks, %s\n", p.Name, p.Manifest, p.Boots, pluralS(p.Boots, "boot"), p.Chunks, formatSize(p.Bytes))
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ORDER\tINDEX\tOFFSET\tLENGTH\tCHUNK")
			for i, e := range p.Entries {
				if i == 20 && !all {
					fmt.Fprintf(tw, "...\t%d more (--all or --json for every chunk)\n", len(p.Entries)-i)
					break
				}
				fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%s\n", i, e.Index, e.Offset, e.Length, e.ID)
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	c.Flags().BoolVar(&all, "all", false, "list every chunk of the profile")
	return c
}

func pluralS(n int, w string) string {
	if n == 1 {
		return w
	}
	return w + "s"
}

func newImageLsCommand(g *globalOptions) *cobra.Command {
	var jsonOut bool
	c := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			rows, err := g.listImages(ctx)
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(rows)
			}
			if len(rows) == 0 {
				fmt.Println("no images; add one with: hoard image add SOURCE --name NAME")
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tFORMAT\tSIZE\tNON-ZERO\tCACHED\tWORKING SET\tMANIFEST")
			for _, r := range rows {
				cached := "100%"
				if r.Chunks > 0 {
					cached = fmt.Sprintf("%.0f%%", 100*float64(r.Present)/float64(r.Chunks))
				}
				ws := "-" // no boot profile yet
				if r.WorkingSetBytes > 0 {
					ws = fmt.Sprintf("%s, %.0f%% here", formatSize(r.WorkingSetBytes), 100*float64(min(r.WorkingSetLocalBytes, r.WorkingSetBytes))/float64(r.WorkingSetBytes))
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Name, r.Format, formatSize(r.Size), formatSize(r.NonZeroBytes), cached, ws, r.Manifest)
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	return c
}

func newImageInspectCommand(g *globalOptions) *cobra.Command {
	var jsonOut, entries bool
	c := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show an image's manifest: size, chunking, source, chunks",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out, err := g.inspectImage(cmd.Context(), args[0], entries)
			if err != nil {
				return err
			}
			r, m := out.ImageInfo, out
			if jsonOut {
				return printJSON(out)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			format := r.Format
			if r.Container != "" {
				format += " (guest content of a " + r.Container + ")"
			}
			fmt.Fprintf(tw, "name\t%s\nmanifest\t%s\nformat\t%s\nsize\t%s (%d bytes)\nnon-zero bytes\t%s\n",
				r.Name, r.Manifest, format, formatSize(r.Size), r.Size, formatSize(r.NonZeroBytes))
			fmt.Fprintf(tw, "chunking\t%s min %d avg %d max %d\n", m.Chunking.Kind, m.Chunking.Min, m.Chunking.Avg, m.Chunking.Max)
			fmt.Fprintf(tw, "chunks\t%d unique, %d cached locally\npinned\t%v\nsource\t%s\n", r.Chunks, r.Present, r.Pinned, r.Source)
			if m.Checksum != "" {
				fmt.Fprintf(tw, "source checksum\t%s\n", m.Checksum)
			}
			if entries {
				fmt.Fprintln(tw, "\nOFFSET\tLENGTH\tCHUNK")
				for _, e := range m.Entries {
					id := e.ID.String()
					if e.Zero {
						id = "(zero)"
					}
					fmt.Fprintf(tw, "%d\t%d\t%s\n", e.Offset, e.Length, id)
				}
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	c.Flags().BoolVar(&entries, "entries", false, "also list every extent (offset, length, chunk)")
	return c
}

func newImageRmCommand(g *globalOptions) *cobra.Command {
	var jsonOut, cluster bool
	c := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove images; chunks no other image uses are deleted",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			svc, err := g.images(ctx, false)
			if err != nil {
				return err
			}
			defer svc.Close()
			var out []api.RemoveResult
			for _, name := range args {
				r, err := svc.Remove(ctx, name, cluster)
				if err != nil {
					return err
				}
				out = append(out, r)
				if !jsonOut {
					fmt.Printf("removed %s (%s): freed %d chunks, %s\n", name, r.Manifest, r.FreedChunks, formatSize(r.FreedBytes))
				}
			}
			if jsonOut {
				return printJSON(out)
			}
			return nil
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print as JSON")
	c.Flags().BoolVar(&cluster, "cluster", false, "remove the image from every node of the cluster (nodes that are down learn it when they return)")
	return c
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
