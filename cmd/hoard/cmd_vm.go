package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
)

func newVMCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "vm",
		Short: "Create VM disks backed by hoard's NBD exports",
	}
	c.AddCommand(newVMOverlayCommand(g))
	return c
}

func newVMOverlayCommand(g *globalOptions) *cobra.Command {
	var libvirt bool
	c := &cobra.Command{
		Use:   "overlay IMAGE PATH.qcow2",
		Short: "Create a qcow2 copy-on-write overlay whose backing file is IMAGE's NBD export",
		Long: `Creates PATH.qcow2 with qemu-img, backed read-only by
nbd+unix:///IMAGE?socket=<nbd.socket>, and prints the qemu command line that
boots a VM on it (--libvirt: the libvirt <disk> element instead). The VM's
writes go to the overlay; reads of unwritten blocks go to the daemon.

The backing is written in QEMU's json: form with the NBD driver's
reconnect-delay and open-timeout (30 s), so a guest's reads wait across a
restart or upgrade of the daemon instead of failing. Under libvirt, which
builds its own NBD client settings, the printed <disk> pauses the guest on an
I/O error instead (virsh resume DOMAIN once the daemon is back).`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			format, sock, err := g.imageBacking(ctx, args[0])
			if err != nil {
				return err
			}
			path, err := filepath.Abs(args[1])
			if err != nil {
				return err
			}
			if err := CreateOverlay(ctx, args[0], format, sock, path); err != nil {
				return err
			}
			if libvirt {
				fmt.Print(LibvirtDisk(args[0], format, sock, path))
				fmt.Fprintf(os.Stderr, "created %s; libvirt has no NBD reconnect, so the disk pauses the guest on an I/O error\n"+
					"(error_policy=stop): if the hoard daemon restarts under a running guest, resume it with `virsh resume DOMAIN`\n", path)
				return nil
			}
			fmt.Fprintf(os.Stderr, "created %s (backing: %s, format %s)\nstart a VM on it with:\n", path, NBDURI(args[0], sock), format)
			fmt.Println(QemuCommand(path))
			return nil
		},
	}
	c.Flags().BoolVar(&libvirt, "libvirt", false, "print the libvirt <disk> XML instead of a qemu command line")
	return c
}

// imageBacking returns the format (raw or qcow2) of a registered image and
// the NBD socket serving it: the running daemon's, else nbd.socket or
// <data_dir>/nbd.sock.
func (g *globalOptions) imageBacking(ctx context.Context, name string) (format, socket string, err error) {
	st, cl, err := g.backend(ctx)
	if err != nil {
		return "", "", err
	}
	if cl != nil {
		d, err := cl.Image(ctx, name, false)
		if err != nil {
			return "", "", err
		}
		s, err := cl.Status(ctx)
		if err != nil {
			return "", "", err
		}
		if s.NBDSocket == "" {
			return "", "", fmt.Errorf("the daemon serves no NBD unix socket (nbd.socket is -); set nbd.socket")
		}
		return d.Format, s.NBDSocket, nil
	}
	defer st.Close()
	id, err := st.Resolve(ctx, name)
	if err != nil {
		return "", "", err
	}
	m, err := st.GetManifest(ctx, id)
	if err != nil {
		return "", "", err
	}
	socket = g.v.GetString("nbd.socket")
	if socket == "" {
		socket = filepath.Join(g.v.GetString("data_dir"), "nbd.sock")
	}
	socket, err = filepath.Abs(socket)
	return m.Format, socket, err
}
