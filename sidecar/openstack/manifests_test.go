package openstack

import (
	"strings"
	"testing"
)

// A template's manifest metadata is checked before it is used: a root
// that is not sha256:<64 hex>, or a manifest volume that is not a volume
// id, is refused; a template without a root has no manifest.
func TestParseManifestRef(t *testing.T) {
	root := "sha256:" + strings.Repeat("ab", 32)
	vol := "0A6C1E92-2B8E-4F7A-9B1D-3C4D5E6F7A8B"
	for _, tc := range []struct {
		meta    map[string]string
		ok      bool
		want    ManifestRef
		errPart string
	}{
		{meta: map[string]string{}, ok: false},
		{meta: map[string]string{MetaManifestRoot: root, MetaManifestVolume: vol}, ok: true, want: ManifestRef{Root: root, Volume: strings.ToLower(vol)}},
		{meta: map[string]string{MetaManifestRoot: root}, ok: true, want: ManifestRef{Root: root}},
		{meta: map[string]string{MetaManifestRoot: "sha256:" + strings.Repeat("AB", 32)}, errPart: MetaManifestRoot},
		{meta: map[string]string{MetaManifestRoot: "md5:" + strings.Repeat("ab", 32)}, errPart: MetaManifestRoot},
		{meta: map[string]string{MetaManifestRoot: root + "00"}, errPart: MetaManifestRoot},
		{meta: map[string]string{MetaManifestRoot: root, MetaManifestVolume: "../../etc"}, errPart: MetaManifestVolume},
		{meta: map[string]string{MetaManifestVolume: vol}, ok: false},
	} {
		ref, ok, err := ParseManifestRef(&Volume{ID: "t", Metadata: tc.meta})
		switch {
		case tc.errPart != "":
			if err == nil || !strings.Contains(err.Error(), tc.errPart) || ok {
				t.Errorf("%v: %v, %v; want an error about %s", tc.meta, ok, err, tc.errPart)
			}
		case err != nil || ok != tc.ok || ref != tc.want:
			t.Errorf("%v: %+v %v %v; want %+v %v", tc.meta, ref, ok, err, tc.want, tc.ok)
		}
	}
}
