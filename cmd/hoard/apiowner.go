package main

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// The API token is root-equivalent, and the CLI reads it from the data dir
// on its own. Before it sends it to an address, it makes sure that the
// socket listening there belongs to the user who owns the token file (the
// daemon's user): otherwise any local user who binds the API port while the
// daemon is down (after a crash the stale api.addr still names it; before the
// first start, api.listen does) would be handed the token by the first
// `hoard status`. Linux tells a listening socket's owner in /proc/net/tcp*.

// checkAPIOwner returns nil when addr (host:port, a loopback address) is a
// TCP socket listening under uid, and an error saying what to do otherwise.
func checkAPIOwner(addr string, uid uint32) error {
	ap, err := netip.ParseAddrPort(strings.TrimPrefix(strings.TrimRight(addr, "/"), "http://"))
	if err != nil {
		if host, port, serr := net.SplitHostPort(addr); serr == nil && host == "localhost" {
			ap, err = netip.ParseAddrPort("127.0.0.1:" + port)
		}
		if err != nil {
			return fmt.Errorf("the API address %q is not a loopback ip:port; set HOARD_API_TOKEN yourself to talk to it", addr)
		}
	}
	if !ap.Addr().IsLoopback() {
		return fmt.Errorf("the API address %s is not on loopback; set HOARD_API_TOKEN yourself to talk to it", addr)
	}
	owners, err := listenerOwners(ap)
	if err != nil {
		return fmt.Errorf("cannot tell who listens on %s (%v); set HOARD_API_TOKEN yourself to talk to it", addr, err)
	}
	if len(owners) == 0 {
		return fmt.Errorf("nothing listens on %s: is the daemon running? (start it with hoard daemon)", addr)
	}
	for _, o := range owners {
		if o != uid {
			return fmt.Errorf("%s is held by uid %d, not by the daemon's user (uid %d, owner of the API token): "+
				"refusing to send it the token; stop that process, or start the daemon (hoard daemon)", addr, o, uid)
		}
	}
	return nil
}

// listenerOwners returns the uids of the TCP sockets listening on ap's port
// at ap's address or at the wildcard address.
func listenerOwners(ap netip.AddrPort) ([]uint32, error) {
	var owners []uint32
	found := false
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		found = true
		sc := bufio.NewScanner(fh)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 8 || fs[3] != "0A" { // TCP_LISTEN
				continue
			}
			local, ok := parseProcAddr(fs[1])
			if !ok || local.Port() != ap.Port() {
				continue
			}
			ip := local.Addr().Unmap()
			if ip != ap.Addr().Unmap() && !ip.IsUnspecified() {
				continue
			}
			uid, err := strconv.ParseUint(fs[7], 10, 32)
			if err != nil {
				continue
			}
			owners = append(owners, uint32(uid))
		}
		fh.Close()
	}
	if !found {
		return nil, fmt.Errorf("no /proc/net/tcp")
	}
	return owners, nil
}

// parseProcAddr decodes /proc/net/tcp's "0100007F:1F40" (IPv4) or its
// 32-hex-digit IPv6 form: the address as 32-bit words in host (little-endian
// on the machines hoard runs on) order, the port in big-endian hex.
func parseProcAddr(s string) (netip.AddrPort, bool) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, false
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, false
	}
	raw, err := hex.DecodeString(h)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, false
	}
	for i := 0; i < len(raw); i += 4 { // each 32-bit word is little-endian
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	ip, ok := netip.AddrFromSlice(raw)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip, uint16(port)), true
}

// fileOwner is the uid owning path.
func fileOwner(path string) (uint32, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("%s: no owner", path)
	}
	return st.Uid, nil
}
