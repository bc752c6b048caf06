package pbitmap

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPersist(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bm")
	h := Header{Kind: "cow", Size: 10<<20 + 123, UnitSize: 512}
	if err := Create(p, h); err != nil {
		t.Fatal(err)
	}
	syncs := 0
	b, err := Open(p, func() error { syncs++; return nil })
	if err != nil {
		t.Fatal(err)
	}
	n := h.Units()
	if b.Len() != n {
		t.Fatalf("len %d want %d", b.Len(), n)
	}
	set := []int64{0, 1, 63, 64, 4095, 4096, 9999, n - 1}
	for _, i := range set {
		if !b.Set(i) || b.Set(i) {
			t.Fatalf("Set(%d) did not report the change once", i)
		}
	}
	if !b.Clear(1) || b.Clear(1) || b.Clear(5) {
		t.Fatal("Clear reports wrong")
	}
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	if syncs != 1 {
		t.Fatalf("data synced %d times, want 1", syncs)
	}
	b.Set(7) // not synced: must not be on disk
	b.Close()

	b, err = Open(p, func() error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	want := map[int64]bool{0: true, 63: true, 64: true, 4095: true, 4096: true, 9999: true, n - 1: true}
	for i := int64(0); i < n; i++ {
		if b.Get(i) != want[i] {
			t.Fatalf("bit %d is %v after reopen, want %v", i, b.Get(i), want[i])
		}
	}
	if b.Count() != int64(len(want)) {
		t.Fatalf("count %d want %d", b.Count(), len(want))
	}
	if h2 := b.Header(); h2 != h {
		t.Fatalf("header %+v want %+v", h2, h)
	}
}

func TestSyncErrorIsSticky(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bm")
	Create(p, Header{Kind: "cache", Size: 1 << 20, UnitSize: 4096})
	fail := errors.New("disk gone")
	b, err := Open(p, func() error { return fail })
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	b.Set(3)
	if err := b.Sync(); !errors.Is(err, fail) {
		t.Fatalf("sync error %v", err)
	}
	if b.Err() == nil || b.Sync() == nil {
		t.Fatal("a failed sync was forgotten")
	}
	h, _ := ReadHeader(p)
	raw, _ := os.ReadFile(p)
	if raw[HeaderSize] != 0 || h.Size != 1<<20 {
		t.Fatal("bits reached disk although the data sync failed")
	}
}

func TestBadFiles(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bm")
	Create(p, Header{Kind: "cache", Size: 1 << 20, UnitSize: 4096})
	os.Truncate(p, HeaderSize+3)
	if _, err := Open(p, nil); !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "want") {
		t.Fatalf("truncated bitmap: %v", err)
	}
	os.WriteFile(p, make([]byte, HeaderSize+32), 0o600)
	if _, err := Open(p, nil); !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "magic") {
		t.Fatalf("bad magic: %v", err)
	}
}

// The data file is synced before the bits that describe it reach the
// bitmap file: when syncData runs, the file must not show them yet.
func TestDataSyncedBeforeBits(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bm")
	Create(p, Header{Kind: "cache", Size: 1 << 20, UnitSize: 4096})
	var early bool
	b, err := Open(p, func() error {
		raw, _ := os.ReadFile(p)
		early = early || raw[HeaderSize] != 0
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	b.Set(0)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	if early || raw[HeaderSize] != 1 {
		t.Fatalf("bit on disk before data sync: %v, after sync: %#x", early, raw[HeaderSize])
	}
}

// A bitmap file of any content opens with an error or a consistent bitmap,
// never a panic or a huge allocation.
func FuzzOpen(f *testing.F) {
	good := encodeHeader(Header{Kind: "cache", Size: 1 << 20, UnitSize: 4096})
	f.Add(append(good, make([]byte, 32)...))
	f.Add(append(good, bytes.Repeat([]byte{0xff}, 32)...))
	f.Add(good[:40])
	f.Fuzz(func(t *testing.T, raw []byte) {
		p := filepath.Join(t.TempDir(), "bm")
		os.WriteFile(p, raw, 0o600)
		b, err := Open(p, func() error { return nil })
		if err != nil {
			return
		}
		defer b.Close()
		var n int64
		for i := int64(0); i < b.Len(); i++ {
			if b.Get(i) {
				n++
			}
		}
		if n != b.Count() {
			t.Fatalf("count %d, bits set %d", b.Count(), n)
		}
	})
}
