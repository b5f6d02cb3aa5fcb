package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// configSearchPaths are where hoard.yaml (or .yml, .json, .toml) is looked
// for when neither --config nor HOARD_CONFIG names a file.
var configSearchPaths = []string{".", "/etc/hoard"}

// nonConfigEnv are HOARD_* variables that are not configuration keys: the
// tests' and benchmarks' switches.
var nonConfigEnv = map[string]bool{
	"HOARD_CONFIG": true, "HOARD_GLANCE_SCRIPT": true, "HOARD_GLANCE_START_TIMEOUT": true,
	"HOARD_GUEST_CACHE": true, "HOARD_NBD_BENCH": true, "HOARD_TEST_REQUIRE_TOOLS": true,
	"HOARD_CRASH_CHILD_DIR": true, "HOARD_CRASH_ROUND": true,
}

// addConfigFlags adds the flags of the keys of scope sc to fs.
func addConfigFlags(fs *pflag.FlagSet, sc scope) {
	aliases := map[string]string{}
	for _, k := range configKeys {
		if k.flag == "" || k.scope != sc {
			continue
		}
		usage := k.help
		if k.def == "" && k.defDoc != "" {
			usage += "; default " + k.defDoc
		}
		if k.accept == acceptSize || k.accept == acceptRate {
			usage += "; units: KiB, MiB, GiB (powers of 1024) or KB, MB, GB (powers of 1000), never a lone G"
		}
		usage += " (config " + k.name + ", env " + k.envName() + ")"
		switch k.kind {
		case kindBool:
			fs.Bool(k.flag, k.def == "true", usage)
		case kindList:
			fs.StringSlice(k.flag, nil, usage)
		default:
			fs.String(k.flag, k.def, usage)
		}
		if k.alias != "" {
			aliases[k.alias] = k.flag
		}
	}
	if len(aliases) > 0 {
		prev := fs.GetNormalizeFunc()
		fs.SetNormalizeFunc(func(f *pflag.FlagSet, name string) pflag.NormalizedName {
			if to, ok := aliases[name]; ok {
				name = to
			}
			return prev(f, name)
		})
	}
}

// load reads the configuration (flags > env > file > defaults) and refuses
// unknown keys, unknown HOARD_* variables and bad values, naming the key.
func (g *globalOptions) load(cmd *cobra.Command) error {
	v := g.v
	v.SetEnvPrefix("HOARD")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_", "-", "_"))
	v.AutomaticEnv()
	for _, k := range configKeys {
		if k.def != "" {
			v.SetDefault(k.name, k.def)
		}
		if k.flag == "" {
			continue
		}
		if f := cmd.Flags().Lookup(k.flag); f != nil {
			if err := v.BindPFlag(k.name, f); err != nil {
				return err
			}
		}
	}
	if err := checkEnv(os.Environ()); err != nil {
		return err
	}
	cf, _ := cmd.Flags().GetString("config")
	if cf == "" {
		cf = os.Getenv("HOARD_CONFIG")
	}
	if cf != "" {
		v.SetConfigFile(cf)
		if err := v.ReadInConfig(); err != nil {
			return fmt.Errorf("read config file %s: %w", cf, err)
		}
	} else {
		v.SetConfigName("hoard")
		for _, p := range configSearchPaths {
			v.AddConfigPath(p)
		}
		if err := v.ReadInConfig(); err != nil {
			var nf viper.ConfigFileNotFoundError
			if !errors.As(err, &nf) {
				return fmt.Errorf("read config file: %w", err)
			}
		}
	}
	if f := v.ConfigFileUsed(); f != "" {
		if abs, err := filepath.Abs(f); err == nil {
			f = abs
		}
		g.configFile = f
		keys, err := fileKeys(v.ConfigFileUsed())
		if err != nil {
			return err
		}
		g.fileKeys = keys
	}
	return g.validate(cmd)
}

// fileKeys reads the keys a config file sets and refuses unknown ones.
func fileKeys(path string) (map[string]bool, error) {
	fv := viper.New()
	fv.SetConfigFile(path)
	if err := fv.ReadInConfig(); err != nil {
		return nil, fmt.Errorf("read config file %s: %w", path, err)
	}
	sections := map[string]bool{}
	for _, k := range configKeys {
		parts := strings.Split(k.name, ".")
		for i := 1; i < len(parts); i++ {
			sections[strings.Join(parts[:i], ".")] = true
		}
	}
	keys := map[string]bool{}
	var bad []string
	for _, name := range fv.AllKeys() {
		k := configKeyByName(name)
		switch {
		case k != nil && k.scope == scopeEnvOnly:
			if sections[name] && fv.Get(name) == nil {
				continue
			}
			bad = append(bad, fmt.Sprintf("%s can only be set in the environment, as %s", name, k.envName()))
		case k != nil:
			keys[name] = true
		case sections[name] && fv.Get(name) == nil:
			// An empty section, e.g. "glance:" with every key commented out.
		default:
			msg := fmt.Sprintf("unknown key %q", name)
			if s := suggestKey(name); s != "" {
				msg += fmt.Sprintf(" (did you mean %s?)", s)
			}
			bad = append(bad, msg)
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return nil, fmt.Errorf("config file %s: %s; the keys are listed by hoard config show and in hoard.example.yaml", path, strings.Join(bad, "; "))
	}
	return keys, nil
}

// checkEnv refuses HOARD_* variables that look like configuration keys but
// are none: HOARD_STORE_QOUTA would otherwise be ignored without a word.
func checkEnv(environ []string) error {
	known := map[string]bool{}
	sections := map[string]bool{}
	for _, k := range configKeys {
		known[k.envName()] = true
		sections[strings.SplitN(k.envName(), "_", 3)[1]] = true
	}
	var bad []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, "HOARD_") || known[name] || nonConfigEnv[name] || strings.HasPrefix(name, "HOARD_BENCH_") {
			continue
		}
		section := strings.SplitN(name, "_", 3)[1]
		near := suggestEnv(name)
		if !sections[section] && near == "" {
			continue // not ours, e.g. another tool's HOARD_ variable
		}
		msg := "unknown variable " + name
		if near != "" {
			msg += fmt.Sprintf(" (did you mean %s?)", near)
		}
		bad = append(bad, msg)
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("environment: %s; unset it, or see hoard config show for the keys", strings.Join(bad, "; "))
	}
	return nil
}

// validate checks every key's effective value.
func (g *globalOptions) validate(cmd *cobra.Command) error {
	for _, k := range configKeys {
		vals, err := k.values(g.raw(k))
		if err == nil && k.check != nil {
			for _, s := range vals {
				if s == "" && !k.required {
					continue // not set
				}
				if err = k.check(s); err != nil {
					err = fmt.Errorf("%q (%w)", s, err)
					break
				}
			}
		}
		if err != nil {
			return fmt.Errorf("%s (from %s): invalid value %v; want %s", k.name, g.source(cmd, k), err, k.accept)
		}
	}
	return nil
}

// raw is a key's effective value as viper holds it. An environment-only key
// is read from the environment: viper's value of "api" is the api section.
func (g *globalOptions) raw(k *configKey) any {
	if k.scope == scopeEnvOnly {
		if s := os.Getenv(k.envName()); s != "" {
			return s
		}
		return nil
	}
	return g.v.Get(k.name)
}

// source says where a key's effective value came from: flag, env, file or
// default (the order viper gives them precedence in).
func (g *globalOptions) source(cmd *cobra.Command, k *configKey) string {
	if k.flag != "" {
		if f := cmd.Flags().Lookup(k.flag); f != nil && f.Changed {
			return "flag --" + k.flag
		}
	}
	if os.Getenv(k.envName()) != "" {
		return "env " + k.envName()
	}
	if g.fileKeys[k.name] {
		return "file " + g.configFile
	}
	return "default"
}

// suggestKey is the known key closest to name, or "".
func suggestKey(name string) string {
	norm := func(s string) string { return strings.NewReplacer("-", "_", ".", "_").Replace(strings.ToLower(s)) }
	best, bestD := "", 3
	for _, k := range configKeys {
		if k.scope == scopeEnvOnly {
			continue
		}
		if d := editDistance(norm(name), norm(k.name)); d < bestD {
			best, bestD = k.name, d
		}
	}
	return best
}

// suggestEnv is the known variable closest to name, or "".
func suggestEnv(name string) string {
	best, bestD := "", 3
	for _, k := range configKeys {
		if d := editDistance(name, k.envName()); d < bestD {
			best, bestD = k.envName(), d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance of a and b
// (insertions, deletions, substitutions and adjacent transpositions).
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}
