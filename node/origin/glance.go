package origin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// glanceImage is the part of a Glance v2 image record hoard reads.
type glanceImage struct {
	ID          string  `json:"id"`
	Name        string  `json:"name"`
	Status      string  `json:"status"`
	Size        *int64  `json:"size"`
	Checksum    *string `json:"checksum"`
	OSHashAlgo  *string `json:"os_hash_algo"`
	OSHashValue *string `json:"os_hash_value"`
	DiskFormat  *string `json:"disk_format"`
}

func openGlance(ctx context.Context, id string, st *settings) (Source, error) {
	if st.GlanceURL == "" {
		return nil, invalidf("open image source glance://%s: no Glance endpoint configured; set origin.glance.url (or HOARD_ORIGIN_GLANCE_URL), e.g. http://controller:9292", id)
	}
	if id == "" || strings.ContainsAny(id, "/?#") {
		return nil, fmt.Errorf("open image source glance://%s: want glance://<image-id>, e.g. glance://9c4f0b4e-...; list ids with: openstack image list", id)
	}
	base := strings.TrimSuffix(strings.TrimRight(st.GlanceURL, "/"), "/v2")
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, invalidf("open image source glance://%s: origin.glance.url %q is not an http(s) URL; set it to the Glance endpoint, e.g. http://controller:9292", id, st.GlanceURL)
	}
	headers := http.Header{}
	for k, v := range st.GlanceHeaders {
		headers.Set(k, v)
	}
	if st.GlanceToken != "" {
		headers.Set("X-Auth-Token", st.GlanceToken)
	}
	imageURL := base + "/v2/images/" + url.PathEscape(id)
	s := &httpSource{
		st:           st,
		url:          imageURL,
		name:         Redact(u.String()) + "/v2/images/" + url.PathEscape(id),
		headers:      headers,
		notFoundHint: fmt.Sprintf("glance image %q does not exist (or is not visible to this project); check the id with: openstack image list", id),
		deniedHint:   "Glance refused the request; check the token in origin.glance.token (HOARD_ORIGIN_GLANCE_TOKEN) and that its project can see the image",
	}
	var img glanceImage
	err = st.retry(ctx, func() error {
		resp, err := s.send(ctx, http.MethodGet, "")
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return s.statusErr(resp)
		}
		defer resp.Body.Close()
		if err := json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&img); err != nil {
			return fmt.Errorf("GET %s: image record is not JSON (%v); check that origin.glance.url is a Glance endpoint", s.name, err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open image source glance://%s: %w", id, err)
	}
	switch img.Status {
	case "active":
	case "killed", "deleted", "pending_delete":
		return nil, mark(ErrNotFound, "open image source glance://%s: the image is %s in Glance, its data is gone; upload it again", id, img.Status)
	default: // queued, saving, uploading, importing, deactivated
		return nil, mark(ErrUnavailable, "open image source glance://%s: the image is %q, not active yet; wait until its upload finishes (openstack image show %s) and try again", id, img.Status, id)
	}
	if img.Size == nil || *img.Size < 0 {
		return nil, fmt.Errorf("open image source glance://%s: Glance reports no size for an active image; check the image with: openstack image show %s", id, id)
	}
	// Prefer the multihash (os_hash_algo, sha512 by default), fall back to the legacy md5.
	var checksum string
	var candidates []string
	if img.OSHashAlgo != nil && img.OSHashValue != nil && *img.OSHashValue != "" {
		candidates = append(candidates, strings.ToLower(*img.OSHashAlgo)+":"+strings.ToLower(*img.OSHashValue))
	}
	if img.Checksum != nil && *img.Checksum != "" {
		candidates = append(candidates, "md5:"+strings.ToLower(*img.Checksum))
	}
	for _, c := range candidates {
		if _, _, _, err := parseChecksum(c); err != nil {
			st.log.Warn("glance announces a checksum hoard cannot verify", "glance_image", id, "err", err)
			continue
		}
		checksum = c
		break
	}
	s.url = imageURL + "/file"
	s.name += "/file"
	s.size = *img.Size
	s.ranges = true // Glance v2 serves Range requests (206 with Content-Range)
	s.ref = Ref{Kind: "glance", Location: id, Checksum: checksum}
	if img.DiskFormat != nil {
		s.format = *img.DiskFormat
	}
	st.log.Debug("origin opened", "glance_image", id, "size", s.size, "checksum", checksum, "disk_format", s.format)
	return s, nil
}
