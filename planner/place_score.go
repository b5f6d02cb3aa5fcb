package planner

import (
	"fmt"
	"math"
	"math/bits"
	"sort"
	"strings"
)

// PlaceImage is an image to place, by manifest entry.
type PlaceImage struct {
	// Sizes are the raw bytes of every manifest entry, in manifest order; a
	// zero entry (never stored) is 0.
	Sizes []int64
	// WorkingSet is the manifest entry indices of the image's boot working
	// set (merged profile). Empty: unknown, and the whole image stands in.
	WorkingSet []int
}

// HostLoad is one candidate host for PlaceScores.
type HostLoad struct {
	// Name is the host's name (what the scheduler calls it).
	Name string
	// Known is false for a host no live node answers for; it scores 0 with
	// Note as its reason.
	Known bool
	Note  string
	// Bits says which manifest entries the host holds: bit i%8 of byte i/8
	// for entry i (p2p.Bitmap's layout); short or nil: the rest is not held.
	Bits []byte
	// Has, when set, is asked instead of Bits, once per data entry.
	Has func(i int) bool
	// OpenExports is the NBD exports open on the host: its running VMs, more
	// or less.
	OpenExports int
	// FreeQuota is the bytes the host's store can still take; -1: no quota.
	FreeQuota int64
}

// HostScore is one host's rank for booting an image.
type HostScore struct {
	Host string
	// Score orders the hosts, in [0, 1]: the working-set share held locally
	// (to a percent), then the whole-image share (to a percent), then the
	// load score, lexicographically; see PlaceScores.
	Score float64
	// WorkingSetShare, ImageShare and LoadScore are the three parts, each in
	// [0, 1].
	WorkingSetShare float64
	ImageShare      float64
	LoadScore       float64
	// Raw bytes: of the working set and of the image, held and in all.
	WorkingSetHeld, WorkingSetBytes int64
	ImageHeld, ImageBytes           int64
	OpenExports                     int
	FreeQuota                       int64
	// Reason says in words why the host ranks where it does.
	Reason string
}

// scoreSteps is the resolution of the working-set and image shares in a
// score: a percent.
const scoreSteps = 100

// PlaceScores ranks hosts for booting img, best first: by the share of the
// image's working-set bytes each holds locally (a boot reads them locally
// and spares the network and the origin), then by the share of the whole
// image it holds (reads after boot), then by load (fewer open exports, more
// free quota), then by name. Unknown hosts come last with score 0.
//
// The score is lexicographic and in [0, 1]: with W and I the working-set and
// image shares rounded down to a percent and L the load score,
//
//	score = (W + I/101 + L/101²) / (1 + 1/101 + 1/101²)
//
// so a host ahead by a percent of working set is ahead whatever its image
// share and load, and the score reads roughly as the working-set share. The
// load score is (1/(1+open exports) + free quota / the most free quota of
// known hosts with a quota) / 2, a host without quota counting as the most.
//
// PlaceScores is pure and takes O(hosts × entries) time.
func PlaceScores(img PlaceImage, hosts []HostLoad) []HostScore {
	var imgBytes, wsBytes int64
	for _, s := range img.Sizes {
		imgBytes += s
	}
	ws := img.WorkingSet
	wsSizes := make([]int64, len(img.Sizes)) // an entry's size if in the working set, else 0
	for _, i := range ws {
		if i >= 0 && i < len(img.Sizes) && wsSizes[i] == 0 {
			wsSizes[i] = img.Sizes[i]
			wsBytes += img.Sizes[i]
		}
	}
	noWS := wsBytes == 0
	if noWS {
		wsBytes = imgBytes
	}
	var maxFree int64
	for _, h := range hosts {
		if h.Known {
			maxFree = max(maxFree, h.FreeQuota)
		}
	}
	out := make([]HostScore, 0, len(hosts))
	for _, h := range hosts {
		s := HostScore{Host: h.Name, WorkingSetBytes: wsBytes, ImageBytes: imgBytes, OpenExports: h.OpenExports, FreeQuota: h.FreeQuota}
		if !h.Known {
			s.Reason = h.Note
			if s.Reason == "" {
				s.Reason = "unknown host"
			}
			out = append(out, s)
			continue
		}
		if h.Has != nil {
			for i, sz := range img.Sizes {
				if sz != 0 && h.Has(i) {
					s.ImageHeld += sz
					s.WorkingSetHeld += wsSizes[i]
				}
			}
		} else {
			bm := h.Bits[:min(len(h.Bits), (len(img.Sizes)+7)/8)]
			for j, by := range bm {
				for by != 0 {
					i := j*8 + bits.TrailingZeros8(by)
					by &= by - 1
					if i < len(img.Sizes) {
						s.ImageHeld += img.Sizes[i]
						s.WorkingSetHeld += wsSizes[i]
					}
				}
			}
		}
		if noWS {
			s.WorkingSetHeld = s.ImageHeld
		}
		s.WorkingSetShare, s.ImageShare = share(s.WorkingSetHeld, wsBytes), share(s.ImageHeld, imgBytes)
		free := 1.0 // no quota
		if h.FreeQuota >= 0 {
			free = 0
			if maxFree > 0 {
				free = float64(h.FreeQuota) / float64(maxFree)
			}
		}
		s.LoadScore = (1/float64(1+max(h.OpenExports, 0)) + free) / 2
		w := math.Floor(s.WorkingSetShare*scoreSteps) / scoreSteps
		im := math.Floor(s.ImageShare*scoreSteps) / scoreSteps
		const k = scoreSteps + 1
		s.Score = min((w+im/k+s.LoadScore/(k*k))/(1+1.0/k+1.0/(k*k)), 1)
		s.Reason = reason(s, noWS)
		out = append(out, s)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Score != out[j].Score {
			return out[i].Score > out[j].Score
		}
		return out[i].Host < out[j].Host
	})
	return out
}

func share(held, total int64) float64 {
	if total <= 0 {
		return 1
	}
	return min(float64(held)/float64(total), 1)
}

func reason(s HostScore, noWS bool) string {
	var b strings.Builder
	if noWS {
		fmt.Fprintf(&b, "no working set known yet; holds %.0f%% of the image (%s of %s)",
			100*s.ImageShare, sizeString(s.ImageHeld), sizeString(s.ImageBytes))
	} else {
		fmt.Fprintf(&b, "holds %.0f%% of the working set (%s of %s) and %.0f%% of the image",
			100*s.WorkingSetShare, sizeString(s.WorkingSetHeld), sizeString(s.WorkingSetBytes), 100*s.ImageShare)
	}
	fmt.Fprintf(&b, "; %d open exports", s.OpenExports)
	if s.FreeQuota >= 0 {
		fmt.Fprintf(&b, "; %s of quota free", sizeString(s.FreeQuota))
	}
	return b.String()
}

// sizeString is n bytes in binary units, for reasons.
func sizeString(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
