package cache

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Emptying a template's cache for other content is cut short (a crash, or
// here a file that cannot be removed) after identity.json and the bitmap
// are gone: the directory then looks new, and a new directory keeps its
// trace (one imported before the first export). The old content's trace
// must not survive as the new content's.
func TestResetCutShortDropsTrace(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	old := Binding{Template: "t", Generation: "1", Origin: "path:/a"}
	r, err := m.Open("t", old, newSrc(1<<20, 1), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, r)
	r.Close()
	base := filepath.Join(dir, "t")
	if err := os.WriteFile(filepath.Join(base, TraceFile), []byte("old content's trace"), 0o600); err != nil {
		t.Fatal(err)
	}
	// "data" cannot be removed: the reset stops there.
	os.Remove(filepath.Join(base, "data"))
	os.MkdirAll(filepath.Join(base, "data", "x"), 0o700)
	moved := Binding{Template: "t", Generation: "1", Origin: "path:/b"}
	if r, err := m.Open("t", moved, newSrc(1<<20, 2), 64<<10); err == nil {
		r.Close()
		t.Fatal("reset went on past a file it could not remove")
	}
	os.RemoveAll(filepath.Join(base, "data")) // the restart after the crash
	r, err = m.Open("t", moved, newSrc(1<<20, 2), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := os.Stat(filepath.Join(base, TraceFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the trace of %s is kept for %s: %v", old, moved, err)
	}
}
