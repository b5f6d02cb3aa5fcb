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
	"syscall"
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
