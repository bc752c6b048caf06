package daemon

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
)

// Two allowed_cow_dirs entries may name one directory (one is a symlink to
// the other). A store used by an export is refused to another export under
// either name, also while the first export is not open (state error after
// a restart): else the second is given the first one's disk.
func TestCowPathAliasRefused(t *testing.T) {
	var alias, cowDir string
	e := newEnv(t, func(c *config.Config) {
		alias = filepath.Join(filepath.Dir(c.StateDir), "cowalias")
		cowDir = filepath.Join(filepath.Dir(c.StateDir), "cow")
		if err := os.MkdirAll(cowDir, 0o700); err != nil {
			t.Fatal(err)
		}
		mustSymlink(t, cowDir, alias)
		c.AllowedCowDirs = []string{cowDir, alias}
	})
	imgA, _ := e.image("a.raw", 1<<20)
	imgB, _ := e.image("b.raw", 1<<20)
	c := ctx(t)
	a, err := e.c.Create(c, api.CreateRequest{ID: "a", Origin: imgA, Mode: api.ModeCOW, CowPath: filepath.Join(cowDir, "disk.img")})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, a.URI, "write -P 0x5a 0 64k", "flush")
	// A's origin is gone at the next start: A stays in state error.
	e.stop()
	os.Rename(imgA, imgA+".away")
	e.start()
	if x, err := e.c.Get(c, "a"); err != nil || x.State != api.StateError {
		t.Fatalf("a after restart without its origin: %+v %v", x, err)
	}
	b, err := e.c.Create(c, api.CreateRequest{ID: "b", Origin: imgB, Mode: api.ModeCOW, CowPath: filepath.Join(alias, "disk.img")})
	if err == nil {
		qemuIO(t, b.URI, "read -P 0x5a 0 64k")
		t.Fatal("export b was given export a's cow store through another name of its directory")
	}
	wantCode(t, "create over another export's store by another name", err, api.CodeConflict)
}
