package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// sizeUnits are the units parseSize takes, matched case-insensitively: IEC
// units (KiB: powers of 1024) and SI units (KB: powers of 1000), never a
// lone K, M, G or T, which tools read either way (10G is 10 GiB to qemu-img
// and 10 GB to a disk vendor): it is refused, not guessed.
var sizeUnits = []struct {
	suffix string
	mult   float64
}{
	{"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"PB", 1e15}, {"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1},
}

// parseSize parses "10GiB", "500MB", "1.5GiB", "4096" (bytes) into bytes;
// "10G" is refused as ambiguous (see sizeUnits).
func parseSize(s string) (int64, error) {
	n, err := sizeValue(s)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: %w", s, err)
	}
	return n, nil
}

func sizeValue(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := 1.0
	for _, u := range sizeUnits {
		if len(t) >= len(u.suffix) && strings.EqualFold(t[len(t)-len(u.suffix):], u.suffix) {
			t, mult = strings.TrimSpace(t[:len(t)-len(u.suffix)]), u.mult
			break
		}
	}
	if n := len(t); n > 0 && strings.ContainsRune("kmgtpKMGTP", rune(t[n-1])) {
		if _, err := strconv.ParseFloat(t[:n-1], 64); err == nil {
			u := strings.ToUpper(t[n-1:])
			return 0, fmt.Errorf("the unit %s is ambiguous: write %s%siB (powers of 1024) or %s%sB (powers of 1000)",
				t[n-1:], t[:n-1], u, t[:n-1], u)
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || !(f >= 0 && f*mult <= 1<<62) {
		return 0, errors.New("use a number with an explicit unit, e.g. 10GiB, 500MiB, 10GB, or bytes (4096)")
	}
	return int64(f * mult), nil
}

// formatSize prints bytes in binary units.
func formatSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}
