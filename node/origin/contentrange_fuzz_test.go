package origin

import (
	"fmt"
	"testing"
)

// FuzzParseContentRange: any header value either parses to a consistent span
// (0 <= first <= last, total unknown (-1) or beyond last) that prints back to
// the same value, or is an error; never a panic.
func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-0/1", "bytes 0-65535/1048576", "bytes 5-9/*", "bytes 9-5/10",
		"bytes -1-3/4", "bytes 0-9/9", "bytes 0-9223372036854775807/*", "bits 0-1/2", "bytes 0-1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		first, last, total, err := parseContentRange(v)
		if err != nil {
			return
		}
		if first < 0 || last < first || (total != -1 && total <= last) {
			t.Fatalf("%q parsed to first %d, last %d, total %d", v, first, last, total)
		}
		tot := "*"
		if total >= 0 {
			tot = fmt.Sprint(total)
		}
		back := fmt.Sprintf("bytes %d-%d/%s", first, last, tot)
		if f2, l2, t2, err := parseContentRange(back); err != nil || f2 != first || l2 != last || t2 != total {
			t.Fatalf("%q -> %q does not parse back the same: %d %d %d %v", v, back, f2, l2, t2, err)
		}
	})
}
