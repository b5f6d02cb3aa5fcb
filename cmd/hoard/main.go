// Command hoard is a peer-to-peer cooperative cache for virtual-machine disk
// images: run `hoard daemon` on every compute node, add images with `hoard image
// add`, and boot VMs from qcow2 overlays backed by hoard's NBD exports.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		if !errors.Is(err, errSilent) {
			fmt.Fprintln(os.Stderr, "hoard:", err)
		}
		os.Exit(1)
	}
}

// version is set at build time: go build -ldflags "-X main.version=v1.2.3"
// (make build sets it from git describe).
var version = ""

// versionString is "hoard VERSION (commit REV[, modified]) GOVERSION OS/ARCH".
// The commit comes from the VCS stamp go build embeds in a git checkout.
func versionString() string {
	v, rev, modified := version, "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version // go install module@version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if v == "" {
		v = "dev"
	}
	commit := "commit unknown"
	if rev != "" {
		commit = "commit " + rev
		if modified {
			commit += ", modified"
		}
	}
	return fmt.Sprintf("hoard %s (%s) %s %s/%s", v, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:         "version",
		Short:       "Print hoard's version, commit and Go version",
		Args:        cobra.NoArgs,
		Annotations: map[string]string{noConfig: "yes"},
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Println(versionString())
			return nil
		},
	}
}
