package node_test

import (
	"testing"

	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/node/origin"
)

func TestDefaultImageName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		ref  origin.Ref
		want string
	}{
		{origin.Ref{Kind: "http", Location: "https://h.example/img/debian.raw?REDACTED"}, "debian.raw"},
		{origin.Ref{Kind: "http", Location: "https://h.example/img/debian.raw"}, "debian.raw"},
		{origin.Ref{Kind: "file", Location: "/var/lib/images/x.qcow2"}, "x.qcow2"},
		{origin.Ref{Kind: "glance", Location: "0c5c7a8e-1e44-4b2e-9a4c-5a3c6a1f2b3d"}, "0c5c7a8e-1e44-4b2e-9a4c-5a3c6a1f2b3d"},
	} {
		if got := local.DefaultName(tc.ref); got != tc.want {
			t.Errorf("DefaultImageName(%+v) = %q, want %q", tc.ref, got, tc.want)
		}
	}
}
