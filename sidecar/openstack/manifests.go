package openstack

import (
	"context"
	"fmt"
	"strings"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// Metadata keys of a template's peers manifest (docs/api.md, "Templates"):
// the template names its manifest's root and the companion volume that
// holds the manifest file; the companion names its template.
const (
	MetaManifestRoot   = "vmthunder_manifest_root"   // sha256:<hex> of the manifest file
	MetaManifestVolume = "vmthunder_manifest_volume" // uuid of the companion volume
	MetaManifestOf     = "vmthunder_manifest_of"     // on the companion: the template's uuid
)

// ManifestRef is where a template's manifest is anchored in Cinder.
type ManifestRef struct {
	Root   string // sha256:<64 hex>
	Volume string // the companion volume's id, "" if none
}

// ParseManifestRef reads a template volume's manifest metadata; a
// template published without one (before manifests were published) has
// none: ok false. Values are checked (whoever could set metadata set
// them).
func ParseManifestRef(v *Volume) (ref ManifestRef, ok bool, err error) {
	root, vol := v.Metadata[MetaManifestRoot], v.Metadata[MetaManifestVolume]
	if root == "" {
		return ManifestRef{}, false, nil
	}
	if hex, cut := strings.CutPrefix(root, "sha256:"); !cut || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
		return ManifestRef{}, false, fmt.Errorf("volume %s: metadata %s %q is not sha256:<64 hex digits>", v.ID, MetaManifestRoot, clip(root))
	}
	if vol != "" && api.ValidVolumeID(vol) != nil {
		return ManifestRef{}, false, fmt.Errorf("volume %s: metadata %s %q is not a volume id", v.ID, MetaManifestVolume, clip(vol))
	}
	return ManifestRef{Root: root, Volume: strings.ToLower(vol)}, true, nil
}

// TemplateManifest reads template volume id's generation and manifest
// reference.
func (c *Client) TemplateManifest(ctx context.Context, id string) (api.Template, ManifestRef, bool, error) {
	t, v, err := c.Template(ctx, id)
	if err != nil {
		return api.Template{}, ManifestRef{}, false, err
	}
	ref, ok, err := ParseManifestRef(v)
	return t, ref, ok, err
}
