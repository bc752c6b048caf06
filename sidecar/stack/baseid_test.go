package stack

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/origin"
)

func baseOf(t *testing.T, o Options) (string, cache.Binding) {
	t.Helper()
	if o.CacheDir == "" && o.Manager == nil {
		o.CacheDir = "/nonexistent"
	}
	id, b, err := o.Base()
	if err != nil {
		t.Fatal(err)
	}
	if err := cache.ValidID(id); err != nil {
		t.Fatal(err)
	}
	return id, b
}

// One LUN is one base however it is named: a URL with or without
// credentials, another portal, or Cinder's connection_info.
func TestVolumeBaseIsTheLUN(t *testing.T) {
	url, _ := baseOf(t, Options{Origin: origin.Spec{URL: "iscsi://user%pa55word@127.0.0.1:3260/iqn.2026-11.org.x:vol/1"}})
	portal, _ := baseOf(t, Options{Origin: origin.Spec{URL: "iscsi://127.0.0.2:3261/iqn.2026-11.org.x:vol/1"}})
	ci, bind := baseOf(t, Options{Origin: origin.Spec{ConnectionInfo: map[string]any{
		"target_portal": "127.0.0.3:3260", "target_iqn": "iqn.2026-11.org.x:vol", "target_lun": 1,
		"auth_method": "CHAP", "auth_username": "u", "auth_password": "pa55word"}}})
	if url != portal || url != ci {
		t.Fatalf("one LUN, three bases: %q %q %q", url, portal, ci)
	}
	if strings.Contains(url, "pa55word") || strings.Contains(bind.Origin, "pa55word") {
		t.Fatalf("password in %q / %q", url, bind.Origin)
	}
	other, _ := baseOf(t, Options{Origin: origin.Spec{URL: "iscsi://127.0.0.1:3260/iqn.2026-11.org.x:vol/2"}})
	if other == url {
		t.Fatal("different LUNs share a base")
	}
}

func TestVolumeBaseOfPaths(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "disk.img"), nil, 0o600)
	os.Symlink(filepath.Join(dir, "disk.img"), filepath.Join(dir, "link"))
	a, _ := baseOf(t, Options{Origin: origin.Spec{URL: filepath.Join(dir, "disk.img")}})
	l, _ := baseOf(t, Options{Origin: origin.Spec{URL: filepath.Join(dir, "link")}})
	b, _ := baseOf(t, Options{Origin: origin.Spec{URL: "/srv/b/disk.img"}})
	if a != l {
		t.Fatalf("a symlink and its target are two bases: %q %q", a, l)
	}
	if a == b {
		t.Fatal("two files with one name share a base")
	}
}

// An iscsi:// URL the parser refuses still carries its credentials: the
// error must not hold the password.
func TestUnparsableISCSIURLKeepsPasswordOut(t *testing.T) {
	for _, u := range []string{"iscsi://admin%s3cretpw@10.0.0.1:3260", "iscsi://admin%s3cretpw@10.0.0.1/iqn.x/notalun"} {
		_, _, err := Options{Origin: origin.Spec{URL: u}, CacheDir: "/x"}.Base()
		if err == nil || strings.Contains(err.Error(), "s3cretpw") {
			t.Errorf("%q: %v", u, err)
		}
	}
}

// Each generation of a template is its own base; the write-through and
// read-only users of a volume are told apart.
func TestTemplateBases(t *testing.T) {
	o := Options{Origin: origin.Spec{URL: "/srv/img"}, Template: "img", Generation: "1"}
	g1, b1 := baseOf(t, o)
	o.Generation = "2"
	g2, _ := baseOf(t, o)
	if g1 == g2 || !strings.HasPrefix(g1, "img.") || !b1.IsTemplate() {
		t.Fatalf("generations: %q %q %+v", g1, g2, b1)
	}
	_, wt := baseOf(t, Options{Origin: origin.Spec{URL: "/srv/v"}, Mode: ModeWriteThrough})
	_, ro := baseOf(t, Options{Origin: origin.Spec{URL: "/srv/v"}, Mode: ModeReadOnly})
	if !wt.Writable || ro.Writable {
		t.Fatalf("writability: %+v %+v", wt, ro)
	}
}
