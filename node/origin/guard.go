package origin

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// blockedAddr reports whether an HTTP origin at ip is refused under
// Config.BlockLoopback: loopback, link-local (cloud metadata services) and
// unspecified addresses, which reach services of the node itself.
func blockedAddr(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsUnspecified()
}

func loopbackErr(host string, ip netip.Addr) error {
	return mark(ErrForbidden, "%s is at %s, a loopback or link-local address; hoard refuses such origins "+
		"(set origin.allow_loopback to allow them)", host, ip)
}

// checkHostAllowed fails early, with a clear message, for a host that
// resolves to a blocked address. The dialer of guardedClient checks every
// connection again (DNS may change, a redirect may point elsewhere).
func checkHostAllowed(ctx context.Context, host string) error {
	if ip, err := netip.ParseAddr(host); err == nil {
		if blockedAddr(ip) {
			return loopbackErr(host, ip)
		}
		return nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil // the request reports it
	}
	for _, ip := range addrs {
		if blockedAddr(ip) {
			return loopbackErr(host, ip)
		}
	}
	return nil
}

// guardedClient is the HTTP client for origins under BlockLoopback: the
// configured client when there is one (its transport is the caller's), else
// a shared client whose dialer refuses blocked addresses.
func (s *settings) guardedClient() *http.Client {
	if s.HTTPClient != nil {
		return s.HTTPClient
	}
	return sharedGuardedClient()
}

var sharedGuardedClient = sync.OnceValue(func() *http.Client {
	c := defaultClient()
	t := c.Transport.(*http.Transport)
	d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second,
		Control: func(network, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("dial %s: %w", address, err)
			}
			if blockedAddr(ap.Addr()) {
				return loopbackErr(address, ap.Addr())
			}
			return nil
		}}
	// A proxy from the environment is dialed (and checked) instead of the
	// origin; checkHostAllowed has checked the origin's name.
	t.DialContext = d.DialContext
	return c
})
