package cache

import "testing"

// Each reference of a shared base counts only its own reads: the first
// reader pays the origin, the second reads the cache.
func TestTallyIsPerReference(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	s := newSrc(1<<20, 1)
	a, err := m.Open("b", testBind, s, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := m.Open("b", testBind, newSrc(1<<20, 1), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	readAll(t, a)
	readAll(t, b)
	if c, s := a.Tally(); s != 1<<20 || c > 1<<20 {
		t.Errorf("first reader: %d from cache, %d from source; want all 1 MiB from source", c, s)
	}
	if c, s := b.Tally(); s != 0 || c != 1<<20 {
		t.Errorf("second reader: %d from cache, %d from source; want 1 MiB from cache", c, s)
	}
}
