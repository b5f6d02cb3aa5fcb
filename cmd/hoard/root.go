package main

import (
	"errors"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/viper"
)

// errSilent is returned by commands that already told the user what went wrong.
var errSilent = errors.New("")

// globalOptions are the flags and config every command shares.
type globalOptions struct {
	v *viper.Viper
	// configFile is the config file loaded ("" for none); fileKeys are the
	// keys it sets.
	configFile string
	fileKeys   map[string]bool
}

// noConfig marks commands that run without reading the configuration.
const noConfig = "hoard/no-config"

func newRootCommand() *cobra.Command {
	g := &globalOptions{v: viper.New()}
	root := &cobra.Command{
		Use:   "hoard",
		Short: "Peer-to-peer cooperative cache for VM disk images",
		Long: `hoard keeps a deduplicated, compressed, content-addressed cache of VM disk
images on every compute node, shares it with peers, and exports every image as
a read-only NBD export that backs VMs' qcow2 overlays.

Configuration comes from flags, HOARD_* environment variables (key upper-cased,
'.' -> '_', e.g. HOARD_DATA_DIR, HOARD_STORE_QUOTA) and an optional config file
(--config or HOARD_CONFIG, else hoard.yaml in the current directory or
/etc/hoard), in that order of precedence. Unknown keys and bad values stop
every command with the key named. hoard config show prints every key's
effective value and where it came from; hoard.example.yaml describes them all.

Sizes take an explicit unit: KiB, MiB, GiB, TiB are powers of 1024 (10GiB =
10737418240 bytes), KB, MB, GB, TB powers of 1000 (10GB = 10000000000 bytes),
a bare number is bytes. A lone K, M, G or T is refused as ambiguous.`,
		Version:       versionString(),
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			for c := cmd; c != nil; c = c.Parent() {
				if c.Annotations[noConfig] != "" {
					return nil
				}
			}
			return g.load(cmd)
		},
	}
	root.SetVersionTemplate("{{.Version}}\n")
	pf := root.PersistentFlags()
	pf.String("config", "", "config file (YAML, TOML or JSON; env HOARD_CONFIG); default hoard.yaml in the current directory or /etc/hoard, if there")
	addConfigFlags(pf, scopeGlobal)
	root.AddCommand(newImageCommand(g), newStoreCommand(g), newDaemonCommand(g), newStatusCommand(g), newVMCommand(g),
		newClusterCommand(g), newPeersCommand(g), newPlaceCommand(g), newConfigCommand(g), newVersionCommand(), newSimCommand())
	return root
}

func (g *globalOptions) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(strings.ToLower(g.v.GetString("log.level")))); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}
