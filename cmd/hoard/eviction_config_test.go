package main

import (
	"testing"

	"github.com/spf13/viper"
)

// TestConfigEvictionReachesNode: store.eviction is what the daemon's
// node.Config gets, planner.DefaultEviction when not set.
func TestConfigEvictionReachesNode(t *testing.T) {
	t.Parallel()
	for set, want := range map[string]string{"": "sharing", "arc": "arc", "lru": "lru"} {
		g := &globalOptions{v: viper.New()}
		for _, k := range configKeys {
			g.v.SetDefault(k.name, k.def)
		}
		g.v.Set("data_dir", t.TempDir())
		if set != "" {
			g.v.Set("store.eviction", set)
		}
		cfg, err := g.nodeConfig()
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Eviction != want {
			t.Errorf("store.eviction %q: node.Config.Eviction %q, want %q", set, cfg.Eviction, want)
		}
	}
}
