package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// A warm-up of a volume's base must not keep the volume's cache past its
// last export: the volume can change once no export of ours is in its
// write path, so the next export must not be served the cached bytes.
func TestWarmDoesNotKeepVolumeCache(t *testing.T) {
	e := newEnv(t, nil)
	img := filepath.Join(e.dir, "vol.raw")
	// Large and sparse: the warm-up is still running when the export goes.
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xaa}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<30); err != nil {
		t.Fatal(err)
	}
	c := ctx(t)
	x, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, x.URI, "read -P 0xaa 0 1M")
	if _, err := e.c.Warm(c, x.Base, &api.WarmRequest{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := e.c.Base(c, x.Base)
		if err != nil {
			t.Fatal(err)
		}
		if b.Warm != nil && b.Warm.DoneBytes >= 4<<20 {
			if b.Warm.State != api.WarmRunning {
				t.Skipf("warm-up finished too soon: %+v", b.Warm)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("warm-up does not progress: %+v", b.Warm)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := e.c.Delete(c, "vm1", true); err != nil {
		t.Fatal(err)
	}
	// The volume changes elsewhere (another node, a revert) while it has
	// no export here.
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(bytes.Repeat([]byte{0xbb}, 1<<20), 0)
	f.Close()
	y, err := e.c.Create(c, api.CreateRequest{ID: "vm2", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, y.URI, "read -P 0xbb 0 1M")
}
