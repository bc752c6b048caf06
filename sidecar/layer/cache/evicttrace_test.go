package cache

import (
	"os"
	"path/filepath"
	"testing"
)

// A base directory that holds only a trace (imported before the base's
// first export) frees nothing when removed: an eviction pass over a full
// cache must not take it, or the wave it was imported for boots without it.
func TestEvictionKeepsTraceOnlyDirectory(t *testing.T) {
	dir := t.TempDir()
	const mb = 1 << 20
	m := mustManager(t, dir, mb)
	pending := filepath.Join(dir, "img.g0123456789ab")
	if err := os.MkdirAll(pending, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pending, TraceFile), []byte("imported"), 0o600); err != nil {
		t.Fatal(err)
	}
	tmpl := Binding{Template: "other", Generation: "1", Origin: "path:/o"}
	r, err := m.Open("other.g1", tmpl, newSrc(2*mb, 1), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, r)
	r.Close() // over budget: an eviction pass
	m.Evict()
	if _, err := os.Stat(filepath.Join(pending, TraceFile)); err != nil {
		t.Fatalf("eviction removed a directory holding only a trace: %v", err)
	}
}
