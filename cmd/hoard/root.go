package main

import (
	"errors"
	"fmt"
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
	v    *viper.Viper
	json bool
}

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
(--config, or hoard.yaml in the current directory or /etc/hoard).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return g.load(cmd)
		},
	}
	pf := root.PersistentFlags()
	pf.String("config", "", "config file (YAML, TOML or JSON)")
	pf.String("data-dir", "./.hoard", "data directory: chunk store, index, identity, profiles (config data_dir)")
	pf.String("store-quota", "10GiB", "chunk store size limit, e.g. 10GiB, 500MiB, 0 for none (config store.quota)")
	pf.String("store-compression", "zstd", "codec for new chunks: zstd (best ratio), s2 (~3x less CPU, ~15% larger) or none (config store.compression)")
	pf.String("log-level", "info", "log level: debug, info, warn, error (config log.level)")
	root.AddCommand(newImageCommand(g), newStoreCommand(g), newDaemonCommand(g), newStatusCommand(g), newVMCommand(g),
		newClusterCommand(g), newPeersCommand(g))
	return root
}

// load reads config: flags > env > file > defaults.
func (g *globalOptions) load(cmd *cobra.Command) error {
	v := g.v
	v.SetEnvPrefix("HOARD")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_", "-", "_"))
	v.AutomaticEnv()
	for _, b := range []struct{ flag, key string }{
		{"data-dir", "data_dir"}, {"store-quota", "store.quota"}, {"log-level", "log.level"},
		{"store-compression", "store.compression"},
		{"nbd-socket", "nbd.socket"}, {"nbd-listen", "nbd.listen"}, {"nbd-max-buffered", "nbd.max_buffered"}, {"api-listen", "api.listen"},
		{"api-token", "api.token"}, {"origin-timeout", "origin.timeout"}, {"origin-allow-loopback", "origin.allow_loopback"}, {"mem-cache", "cache.memory"}, {"hot-cache", "cache.hot"},
		{"p2p-listen", "p2p.listen"}, {"p2p-bootstrap", "p2p.bootstrap"}, {"p2p-swarm-key-file", "p2p.swarm_key_file"},
		{"p2p-upload-limit", "p2p.upload_limit"}, {"p2p-allow", "p2p.allow"},
	} {
		if f := cmd.Flags().Lookup(b.flag); f != nil {
			if err := v.BindPFlag(b.key, f); err != nil {
				return err
			}
		}
	}
	if cf, _ := cmd.Flags().GetString("config"); cf != "" {
		v.SetConfigFile(cf)
		if err := v.ReadInConfig(); err != nil {
			return fmt.Errorf("read config %s: %w", cf, err)
		}
	} else {
		v.SetConfigName("hoard")
		v.AddConfigPath(".")
		v.AddConfigPath("/etc/hoard")
		if err := v.ReadInConfig(); err != nil {
			var nf viper.ConfigFileNotFoundError
			if !errors.As(err, &nf) {
				return fmt.Errorf("read config: %w", err)
			}
		}
	}
	return nil
}

func (g *globalOptions) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.v.GetString("log.level"))); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}
