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

// version and commit are set at build time, go build -ldflags
// "-X main.version=v1.2.3 -X main.commit=REV" (make build sets them from
// git). Without commit, the VCS stamp go build embeds in a git checkout is
// used (not in a git worktree, nor with -buildvcs=false).
var version, commit = "", ""

// versionString is "hoard VERSION (commit REV[, modified]) GOVERSION OS/ARCH".
// The commit comes from the VCS stamp go build embeds in a git checkout.
func versionString() string {
	v, rev, modified := version, commit, false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version // go install module@version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if rev == "" {
					rev = s.Value
				}
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if v == "" {
		v = "dev"
	}
	c := "commit unknown"
	if rev != "" {
		c = "commit " + rev
		if modified {
			c += ", modified"
		}
	}
	return fmt.Sprintf("hoard %s (%s) %s %s/%s", v, c, runtime.Version(), runtime.GOOS, runtime.GOARCH)
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
