package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
)

// parseSize parses "10GiB", "500MB", "1.5GiB", "4096" (bytes) into bytes
// with go-humanize: IEC units (KiB: powers of 1024) and SI units (KB: powers
// of 1000), case-insensitively. A lone K, M, G or T, which tools read either
// way (10G is 10 GiB to qemu-img and 10 GB to a disk vendor), is refused, not
// guessed.
func parseSize(s string) (int64, error) {
	n, err := sizeValue(s)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: %w", s, err)
	}
	return n, nil
}

func sizeValue(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if n := len(t); n > 0 && strings.ContainsRune("kmgtpeKMGTPE", rune(t[n-1])) {
		if _, err := strconv.ParseFloat(strings.TrimSpace(t[:n-1]), 64); err == nil {
			u, num := strings.ToUpper(t[n-1:]), strings.TrimSpace(t[:n-1])
			return 0, fmt.Errorf("the unit %s is ambiguous: write %s%siB (powers of 1024) or %s%sB (powers of 1000)",
				t[n-1:], num, u, num, u)
		}
	}
	bad := errors.New("use a number with an explicit unit, e.g. 10GiB, 500MiB, 10GB, or bytes (4096)")
	if t == "" || t[0] == '-' || t[0] == '+' {
		return 0, bad
	}
	n, err := humanize.ParseBytes(t)
	if err != nil || n > 1<<62 {
		return 0, bad
	}
	return int64(n), nil
}

// formatSize prints bytes in binary units (go-humanize's IBytes).
func formatSize(n int64) string {
	if n < 0 {
		return "-" + humanize.IBytes(uint64(-n))
	}
	return humanize.IBytes(uint64(n))
}
