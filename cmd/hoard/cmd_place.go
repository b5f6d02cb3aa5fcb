package main

import (
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"
)

func newPlaceCommand(g *globalOptions) *cobra.Command {
	var jsonOut bool
	var hosts []string
	c := &cobra.Command{
		Use:   "place IMAGE",
		Short: "Rank the cluster's hosts for booting IMAGE (a name, manifest CID or Glance image ID): working set held, then image held, then load",
		Long: "Rank every live node of the cluster (or the --hosts given) for booting IMAGE, by the share of the image's\n" +
			"boot working set each holds locally, then the share of the whole image, then load (open exports, free quota),\n" +
			"with a score in [0,1] and a reason per host. Hosts are named by their node.name. The daemon answers from what it\n" +
			"already knows and never waits for a peer; the Nova weigher in contrib/nova asks the same (GET /v1/place).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cl, err := g.daemon(ctx)
			if err != nil {
				return err
			}
			p, err := cl.Place(ctx, args[0], hosts)
			if err != nil {
				return err
			}
			if jsonOut {
				return printJSON(p.Hosts)
			}
			fmt.Printf("image %s (%s): working set %s, image %s\n", p.Image, p.Manifest, formatSize(p.WorkingSetBytes), formatSize(p.ImageBytes))
			if p.Partial {
				fmt.Println("(this node's view of its peers' chunks is being refreshed: ask again in a moment for a fuller answer)")
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "HOST\tSCORE\tWORKING SET\tIMAGE\tEXPORTS\tREASON")
			for _, h := range p.Hosts {
				name := h.Host
				if h.Self {
					name += " (this node)"
				}
				fmt.Fprintf(tw, "%s\t%.3f\t%.0f%%\t%.0f%%\t%d\t%s\n", name, h.Score, 100*h.WorkingSetShare, 100*h.ImageShare, h.OpenExports, h.Reason)
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&jsonOut, "json", false, "print the ranked hosts as a JSON list (host, score, reason, ...)")
	c.Flags().StringSliceVar(&hosts, "hosts", nil, "rank only these hosts (node.name values, comma-separated); unknown ones score 0")
	return c
}
