package openstack

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	"github.com/gophercloud/gophercloud/v2/openstack/blockstorage/v3/volumes"
	"github.com/gophercloud/gophercloud/v2/pagination"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// Metadata keys of a published template (docs/api.md, "Templates").
const (
	MetaTemplate      = "vmthunder_template" // "1"
	MetaGeneration    = "vmthunder_generation"
	MetaImageID       = "vmthunder_image_id"
	MetaImageChecksum = "vmthunder_image_checksum"
	MetaChunkSize     = "vmthunder_chunk_size"
	MetaSize          = "vmthunder_size"
)

// Volume is a Cinder volume as this package reads it.
type Volume = volumes.Volume

// MaxTemplates bounds a template listing.
const MaxTemplates = 10000

// ErrNotTemplate: the volume carries no vmthunder_template=1 (or its
// template metadata is damaged).
var ErrNotTemplate = errors.New("not a published template")

// Volume reads one volume.
func (c *Client) Volume(ctx context.Context, id string) (*Volume, error) {
	v, err := volumes.Get(ctx, c.bs, id).Extract()
	if err != nil {
		return nil, wrap("get volume "+id, err)
	}
	return v, nil
}

// Template reads volume id and its template metadata; a volume that is
// not a published template is ErrNotTemplate.
func (c *Client) Template(ctx context.Context, id string) (api.Template, *Volume, error) {
	v, err := c.Volume(ctx, id)
	if err != nil {
		return api.Template{}, nil, err
	}
	t, err := ParseTemplate(v)
	return t, v, err
}

// ParseTemplate reads a volume's template metadata, checking every value
// (it came from whoever could set metadata on the volume).
func ParseTemplate(v *Volume) (api.Template, error) {
	m := v.Metadata
	if m[MetaTemplate] != "1" {
		return api.Template{}, fmt.Errorf("volume %s: %w (no metadata %s=1; publish it with vmthunder publish)", v.ID, ErrNotTemplate, MetaTemplate)
	}
	bad := func(key, why string) (api.Template, error) {
		return api.Template{}, fmt.Errorf("volume %s: %w: metadata %s %s", v.ID, ErrNotTemplate, key, why)
	}
	gen := m[MetaGeneration]
	if hex, ok := strings.CutPrefix(gen, "sha256:"); !ok || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
		return bad(MetaGeneration, fmt.Sprintf("%q is not sha256:<64 hex digits>", clip(gen)))
	}
	size, err := strconv.ParseInt(m[MetaSize], 10, 64)
	if err != nil || size <= 0 || size > int64(v.Size)<<30 {
		return bad(MetaSize, fmt.Sprintf("%q is not a byte count within the volume's %d GiB", clip(m[MetaSize]), v.Size))
	}
	chunk, err := strconv.ParseInt(m[MetaChunkSize], 10, 64)
	if err != nil || chunk < 4096 || chunk > 64<<20 || chunk&(chunk-1) != 0 {
		return bad(MetaChunkSize, fmt.Sprintf("%q is not a power of two between 4K and 64M", clip(m[MetaChunkSize])))
	}
	t := api.Template{VolumeID: v.ID, Name: v.Name, ImageID: m[MetaImageID], Generation: gen, Size: size, ChunkSize: chunk, Status: v.Status}
	if !v.CreatedAt.IsZero() {
		t.CreatedAt = v.CreatedAt.UTC().Format(time.RFC3339)
	}
	return t, nil
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// ValidImageID checks an image id given to filter on: it ends up inside
// Cinder's metadata filter literal, so only plain id characters pass.
func ValidImageID(id string) error {
	if len(id) > 255 || strings.Trim(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-") != "" {
		return fmt.Errorf("image id %q is not 1-255 of [A-Za-z0-9._:-]", clip(id))
	}
	return nil
}

// Templates lists the published templates (metadata vmthunder_template=1,
// status available or in-use), newest first; imageID, when set, keeps
// those of that image. Volumes whose metadata is damaged are left out.
func (c *Client) Templates(ctx context.Context, imageID string) ([]api.Template, error) {
	if err := ValidImageID(imageID); err != nil {
		return nil, err
	}
	meta := map[string]string{MetaTemplate: "1"}
	if imageID != "" {
		meta[MetaImageID] = imageID
	}
	var out []api.Template
	seen := 0
	err := volumes.List(c.bs, volumes.ListOpts{Metadata: meta, Sort: "created_at:desc", Limit: 200}).EachPage(ctx,
		func(_ context.Context, p pagination.Page) (bool, error) {
			vs, err := volumes.ExtractVolumes(p)
			if err != nil {
				return false, err
			}
			for i := range vs {
				if seen++; seen > MaxTemplates {
					return false, fmt.Errorf("more than %d template volumes", MaxTemplates)
				}
				if !TemplateServable(vs[i].Status) {
					continue
				}
				t, err := ParseTemplate(&vs[i])
				if err != nil || imageID != "" && t.ImageID != imageID {
					continue
				}
				out = append(out, t)
			}
			return true, nil
		})
	if err != nil {
		return nil, wrap("list template volumes", err)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].CreatedAt > out[j].CreatedAt })
	if out == nil {
		out = []api.Template{}
	}
	return out, nil
}

// TemplateVolumes lists every volume tagged vmthunder_template=1, in any
// status (the daemon looks for attachments it left behind).
func (c *Client) TemplateVolumes(ctx context.Context) ([]Volume, error) {
	var out []Volume
	err := volumes.List(c.bs, volumes.ListOpts{Metadata: map[string]string{MetaTemplate: "1"}, Limit: 200}).EachPage(ctx,
		func(_ context.Context, p pagination.Page) (bool, error) {
			vs, err := volumes.ExtractVolumes(p)
			if err != nil {
				return false, err
			}
			for _, v := range vs {
				if v.Metadata[MetaTemplate] == "1" {
					out = append(out, v)
				}
			}
			if len(out) > MaxTemplates {
				return false, fmt.Errorf("more than %d template volumes", MaxTemplates)
			}
			return true, nil
		})
	return out, wrap("list template volumes", err)
}

// CreateOpts is a volume to create.
type CreateOpts struct {
	Name       string
	SizeGiB    int
	VolumeType string
	Metadata   map[string]string
	ImageID    string // create from this Glance image
}

// CreateVolume asks Cinder for a volume; it is usually still "creating".
func (c *Client) CreateVolume(ctx context.Context, o CreateOpts) (*Volume, error) {
	v, err := volumes.Create(ctx, c.bs, volumes.CreateOpts{Name: o.Name, Size: o.SizeGiB, VolumeType: o.VolumeType,
		Metadata: o.Metadata, ImageID: o.ImageID}, nil).Extract()
	if err != nil {
		return nil, wrap("create volume "+o.Name, err)
	}
	return v, nil
}

// DeleteVolume deletes a volume (publish cleans up after a failure).
func (c *Client) DeleteVolume(ctx context.Context, id string) error {
	return wrap("delete volume "+id, volumes.Delete(ctx, c.bs, id, nil).ExtractErr())
}

// WaitStatus polls volume id until its status is one of want; a status
// ending in "error" (error, error_restoring, ...) ends the wait at once.
// progress, when set, is told each status seen.
func (c *Client) WaitStatus(ctx context.Context, id string, timeout time.Duration, progress func(status string), want ...string) (*Volume, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	delay := 500 * time.Millisecond
	last := ""
	for {
		v, err := c.Volume(ctx, id)
		if err != nil && ctx.Err() == nil {
			return nil, err
		}
		if v != nil {
			last = v.Status
			if progress != nil {
				progress(v.Status)
			}
			for _, w := range want {
				if v.Status == w {
					return v, nil
				}
			}
			if strings.HasPrefix(v.Status, "error") {
				return v, &Error{Op: "volume " + id, Message: fmt.Sprintf("status %s (want %s): see cinder-volume's log", v.Status, strings.Join(want, " or "))}
			}
		}
		select {
		case <-ctx.Done():
			return v, &Error{Op: "volume " + id, Message: fmt.Sprintf("still %s after %s (want %s)", last, timeout, strings.Join(want, " or "))}
		case <-time.After(delay):
		}
		if delay < 5*time.Second {
			delay += delay / 2
		}
	}
}

// SetMetadata adds or replaces the given keys of a volume's metadata
// (other keys stay).
func (c *Client) SetMetadata(ctx context.Context, id string, meta map[string]string) error {
	_, err := c.bs.Post(ctx, c.bs.ServiceURL("volumes", id, "metadata"), map[string]any{"metadata": meta}, nil,
		&gophercloud.RequestOpts{OkCodes: []int{200}})
	return wrap("set metadata of volume "+id, err)
}

// SetReadOnly sets a volume's read-only flag (os-update_readonly_flag):
// every later attachment is read-only.
func (c *Client) SetReadOnly(ctx context.Context, id string, ro bool) error {
	_, err := c.bs.Post(ctx, c.bs.ServiceURL("volumes", id, "action"),
		map[string]any{"os-update_readonly_flag": map[string]any{"readonly": ro}}, nil,
		&gophercloud.RequestOpts{OkCodes: []int{202}})
	return wrap("set the read-only flag of volume "+id, err)
}

// findMessage digs the message out of an OpenStack error body:
// {"<kind>": {"message": "..."}} (Cinder) or {"error": {"message": ...}}
// (Keystone).
func findMessage(body []byte) string {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return ""
	}
	for _, raw := range m {
		var inner struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(raw, &inner) == nil && inner.Message != "" {
			return inner.Message
		}
	}
	return ""
}

// TemplateServable reports whether a template volume in status can be
// attached and read. A read-only multi-attach volume passes through
// reserved, attaching and detaching whenever any node attaches or detaches
// it; its content is the same throughout, so those states do not hide it
// from a node that boots at the same moment.
func TemplateServable(status string) bool {
	switch status {
	case "available", "in-use", "reserved", "attaching", "detaching":
		return true
	}
	return false
}
