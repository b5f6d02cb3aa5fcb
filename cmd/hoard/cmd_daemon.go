package main

import (
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/hoardvm/hoard/node"
	"github.com/spf13/cobra"
)

func newDaemonCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "daemon",
		Short: "Run the hoard daemon: NBD exports of every image and the admin API",
		Long: `Runs a hoard node on the data dir: serves every registered image as a
read-only NBD export (by name and by manifest CID) on the unix socket
nbd.socket (default <data_dir>/nbd.sock) and, when set, over TCP on
nbd.listen (keep it on loopback); fetches missing chunks from the image's
origin (copy-on-read); learns boot profiles; and answers the admin API on
api.listen (default 127.0.0.1:7480). Every API request but /healthz,
/readyz and /metrics needs a bearer token: api.token when set, otherwise the
random token the daemon creates on first start in <data_dir>/api.token (mode
0600; the CLI reads it there). Whoever holds the token controls the daemon.

While it runs, the other hoard commands on the same data dir go through its API.
Boot a VM on an image with: hoard vm overlay IMAGE vm.qcow2`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := g.nodeConfig()
			if err != nil {
				return err
			}
			log := g.logger()
			if g.configFile != "" {
				log.Info("config file loaded", "file", g.configFile)
			} else if cf, _ := cmd.Flags().GetString("config"); cf == "" {
				log.Info("no config file found; using flags, environment and defaults", "searched", configSearchList())
			}
			n, err := node.New(cfg, log)
			if err != nil {
				return err
			}
			return n.Run(cmd.Context())
		},
	}
	addConfigFlags(c.Flags(), scopeDaemon)
	return c
}

// nodeConfig builds the daemon's configuration from flags, env and file.
func (g *globalOptions) nodeConfig() (node.Config, error) {
	v := g.v
	dir := v.GetString("data_dir")
	if dir == "" {
		return node.Config{}, fmt.Errorf("no data dir: set --data-dir or HOARD_DATA_DIR")
	}
	quota, err := parseSize(v.GetString("store.quota"))
	if err != nil {
		return node.Config{}, fmt.Errorf("store.quota: %w", err)
	}
	mem, err := parseSize(v.GetString("cache.memory"))
	if err != nil {
		return node.Config{}, fmt.Errorf("cache.memory: %w", err)
	}
	if mem == 0 {
		mem = -1 // none
	}
	var hot int64 // not set: the node sizes it by the free disk space
	if s := v.GetString("cache.hot"); s != "" {
		if hot, err = parseSize(s); err != nil {
			return node.Config{}, fmt.Errorf("cache.hot: %w", err)
		}
		if hot == 0 {
			hot = -1 // none
		}
	}
	var nbdBuf int64
	if s := v.GetString("nbd.max_buffered"); s != "" {
		if nbdBuf, err = parseSize(s); err != nil {
			return node.Config{}, fmt.Errorf("nbd.max_buffered: %w", err)
		}
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return node.Config{}, err
	}
	upload, err := parseRate(v.GetString("p2p.upload_limit"))
	if err != nil {
		return node.Config{}, fmt.Errorf("p2p.upload_limit: %w", err)
	}
	unlimitedIfZero := func(r int64) int64 {
		if r == 0 {
			return -1
		}
		return r
	}
	originRate, err := parseRate(v.GetString("origin.rate"))
	if err != nil {
		return node.Config{}, fmt.Errorf("origin.rate: %w", err)
	}
	hoardRate, err := parseRate(v.GetString("hoard.rate"))
	if err != nil {
		return node.Config{}, fmt.Errorf("hoard.rate: %w", err)
	}
	var budget int64 // not set: half of the quota
	if s := v.GetString("hoard.budget"); s != "" {
		if budget, err = parseSize(s); err != nil {
			return node.Config{}, fmt.Errorf("hoard.budget: %w", err)
		}
		if budget == 0 {
			budget = -1 // off
		}
	}
	keyFile := v.GetString("p2p.swarm_key_file")
	if keyFile != "" {
		if keyFile, err = filepath.Abs(keyFile); err != nil {
			return node.Config{}, err
		}
	}
	sockMode, err := configMode(v.Get("nbd.socket_mode"))
	if err != nil {
		return node.Config{}, fmt.Errorf("nbd.socket_mode: %w", err)
	}
	oc := g.originConfig()
	// A daemon run by root must not fetch from the node's own services
	// (SSRF) for whoever holds the API token, unless told to.
	oc.BlockLoopback = !v.GetBool("origin.allow_loopback")
	return node.Config{
		DataDir:             abs,
		StoreQuota:          quota,
		StoreCompression:    v.GetString("store.compression"),
		Eviction:            v.GetString("store.eviction"),
		NBDSocket:           v.GetString("nbd.socket"),
		NBDListen:           v.GetString("nbd.listen"),
		GlanceListen:        v.GetString("glance.listen"),
		GlanceMaxDownloads:  v.GetInt("glance.max_downloads"),
		GlanceWriteTimeout:  v.GetDuration("glance.write_timeout"),
		NBDSocketGroup:      v.GetString("nbd.socket_group"),
		NBDSocketMode:       fs.FileMode(sockMode),
		NBDMaxBufferedBytes: nbdBuf,
		APIListen:           v.GetString("api.listen"),
		APIToken:            v.GetString("api.token"),
		Origin:              oc,
		OriginTimeout:       v.GetDuration("origin.timeout"),
		OriginRate:          unlimitedIfZero(originRate),
		HoardBudget:         budget,
		HoardRate:           unlimitedIfZero(hoardRate),
		NodeName:            v.GetString("node.name"),
		MemCache:            mem,
		HotCache:            hot,
		P2P: node.P2PConfig{
			Listen:       splitList(v.GetStringSlice("p2p.listen")),
			Bootstrap:    splitList(v.GetStringSlice("p2p.bootstrap")),
			SwarmKeyFile: keyFile,
			UploadLimit:  upload,
			AllowList:    splitList(v.GetStringSlice("p2p.allow")),
		},
	}, nil
}
