package nbd_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"

	"github.com/hoardvm/hoard/nbd"
)

// bytesExport serves a byte slice.
type bytesExport []byte

func (b bytesExport) Size() int64 { return int64(len(b)) }
func (b bytesExport) ReadAt(ctx context.Context, p []byte, off int64) error {
	copy(p, b[off:])
	return nil
}
func (b bytesExport) Close() error { return nil }

type oneExport struct{ data []byte }

func (x oneExport) Open(ctx context.Context, name string) (nbd.Export, error) {
	if name != "demo" {
		return nil, fmt.Errorf("export %q: %w", name, nbd.ErrUnknownExport)
	}
	return bytesExport(x.data), nil
}

func (x oneExport) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	return []nbd.ExportInfo{{Name: "demo", Description: "1 MiB of zeroes"}}, nil
}

// Serve one export on a unix socket until interrupted; read it with
// qemu-img info 'nbd+unix:///demo?socket=/tmp/demo.sock'.
func ExampleServer_Serve() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	ln, err := net.Listen("unix", "/tmp/demo.sock")
	if err != nil {
		fmt.Println(err)
		return
	}
	srv := &nbd.Server{Exporter: oneExport{make([]byte, 1<<20)}, Log: slog.Default()}
	if err := srv.Serve(ctx, ln); err != nil {
		fmt.Println(err)
	}
}
