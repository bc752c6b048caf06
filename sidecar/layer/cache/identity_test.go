package cache

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// fill reads the whole base through a reference, so every chunk is cached.
func fill(t *testing.T, r *Ref) { readAll(t, r) }

// A volume's cache never outlives its last reference: reopened after the
// volume changed, it serves the new bytes.
func TestVolumeCacheDroppedAtLastRelease(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	vol := Binding{Origin: "path:/v"}
	s := newSrc(1<<20, 1)
	r, err := m.Open("v", vol, s, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, r)
	r.Close()
	if _, err := os.Stat(filepath.Join(dir, "v")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("volume cache kept after its last release: %v", err)
	}
	changed := newSrc(1<<20, 2)
	r, err = m.Open("v", vol, changed, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if !bytes.Equal(readAll(t, r), contents(changed)) {
		t.Fatal("reopened volume base served the old bytes")
	}
}

// A volume cache left behind (a crash) is emptied when opened, not served.
func TestVolumeCacheLeftoverIsRebuilt(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	vol := Binding{Origin: "path:/v"}
	r, err := m.Open("v", vol, newSrc(1<<20, 1), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, r)
	// Simulate a crash: close the files without the release that drops it.
	r.Base.close(false)
	m.mu.Lock()
	delete(m.open, "v")
	m.mu.Unlock()

	changed := newSrc(1<<20, 2)
	r, err = m.Open("v", vol, changed, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Rebuilt() == "" {
		t.Error("Rebuilt() does not say the leftover was emptied")
	}
	if !bytes.Equal(readAll(t, r), contents(changed)) {
		t.Fatal("leftover volume cache served stale bytes")
	}
}

// A template cache is reused only for the same template, generation and
// origin; anything else empties it.
func TestTemplateCacheKeptOnlyForItsContent(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	g1 := Binding{Template: "img", Generation: "1", Origin: "path:/a"}
	src := newSrc(1<<20, 1)
	r, err := m.Open("img", g1, src, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, r)
	r.Close()

	// Same content: served from the cache even with the origin gone bad.
	r, err = m.Open("img", g1, newSrc(1<<20, 9), 0)
	if err != nil {
		t.Fatal(err)
	}
	if r.Rebuilt() != "" || !bytes.Equal(readAll(t, r), contents(src)) {
		t.Fatal("same generation was not served from its cache")
	}
	r.Close()

	for _, other := range []Binding{
		{Template: "img", Generation: "2", Origin: "path:/a"},
		{Template: "img", Generation: "1", Origin: "path:/b"},
		{Template: "other", Generation: "1", Origin: "path:/a"},
	} {
		fresh := newSrc(1<<20, 3)
		r, err := m.Open("img", other, fresh, 0)
		if err != nil {
			t.Fatal(err)
		}
		if r.Rebuilt() == "" || !bytes.Equal(readAll(t, r), contents(fresh)) {
			t.Fatalf("%s served the cache of %s", other, g1)
		}
		r.Close()
		g1 = other
	}
}

// An open base refuses a second user with another origin or writability.
func TestOpenBaseRefusesOtherBinding(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	wt := Binding{Origin: "iscsi:iqn.x:1", Writable: true}
	r, err := m.Open("v", wt, newSrc(1<<20, 1), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, b := range []Binding{
		{Origin: "iscsi:iqn.x:1"},
		{Origin: "iscsi:iqn.x:2", Writable: true},
		{Template: "v", Generation: "1", Origin: "iscsi:iqn.x:1"},
	} {
		if _, err := m.Open("v", b, newSrc(1<<20, 2), 0); !errors.Is(err, ErrConflict) {
			t.Errorf("%s over an open %s: %v, want ErrConflict", b, wt, err)
		}
	}
	r2, err := m.Open("v", wt, newSrc(1<<20, 1), 0)
	if err != nil {
		t.Fatalf("second write-through user of one volume: %v", err)
	}
	r2.Close()
}

func TestBindingRules(t *testing.T) {
	for _, b := range []Binding{
		{},
		{Template: "t", Origin: "o"},
		{Generation: "1", Origin: "o"},
		{Template: "t", Generation: "1", Origin: "o", Writable: true},
	} {
		if err := b.validate(); err == nil {
			t.Errorf("%+v accepted", b)
		}
	}
}

// DropStale removes volume caches and caches without an identity, and
// keeps templates.
func TestDropStale(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	r, _ := m.Open("tmpl", testBind, newSrc(1<<20, 1), 0)
	r.Close()
	for _, d := range []string{"vol", "legacy"} {
		os.MkdirAll(filepath.Join(dir, d), 0o700)
		os.WriteFile(filepath.Join(dir, d, "bitmap"), []byte("x"), 0o600)
	}
	writeIdentity(filepath.Join(dir, "vol"), Binding{Origin: "path:/v"})
	os.MkdirAll(filepath.Join(dir, "imported"), 0o700) // a trace imported before the first export
	os.WriteFile(filepath.Join(dir, "imported", "trace"), []byte("t"), 0o600)
	got, err := m.DropStale()
	if err != nil || len(got) != 2 {
		t.Fatalf("dropped %v, %v", got, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "tmpl", "bitmap")); err != nil {
		t.Fatalf("template dropped: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "imported", "trace")); err != nil {
		t.Fatalf("a directory with nothing cached dropped: %v", err)
	}
}

// contents is what src holds, read past its counters.
func contents(s *src) []byte {
	p := make([]byte, s.Size())
	s.Dev.ReadAt(p, 0)
	return p
}
