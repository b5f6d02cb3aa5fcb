package nbd_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

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

// Serve one export on a unix socket until the context ends. A client such
// as qemu-img info 'nbd+unix:///demo?socket=/path/demo.sock' reads it; here
// a raw connection shows the server's greeting.
func ExampleServer_Serve() {
	dir, err := os.MkdirTemp("", "nbd-example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", filepath.Join(dir, "demo.sock"))
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := &nbd.Server{Exporter: oneExport{make([]byte, 1<<20)}, Log: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()

	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		fmt.Println(err)
		return
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greeting := make([]byte, 16)
	if _, err := io.ReadFull(c, greeting); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s\n", greeting)
	c.Close()

	cancel() // Serve closes the listener and every connection, and returns nil
	fmt.Println("Serve returned", <-done)
	// Output:
	// NBDMAGICIHAVEOPT
	// Serve returned <nil>
}
