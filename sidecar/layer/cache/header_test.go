package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache/pbitmap"
)

// openNoPanic opens base "b", turning a panic (a huge make) into an error.
func openNoPanic(m *Manager, s *src) (r *Ref, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return m.Open("b", testBind, s, 0)
}

// A damaged chunk size in an existing cache's header is refused with a
// clear error, before anything is sized by it.
func TestCorruptChunkSize(t *testing.T) {
	for _, bad := range []int64{1 << 62, 128 << 20, 3 << 20, 5000, 2048} {
		t.Run(fmt.Sprint(bad), func(t *testing.T) {
			dir := t.TempDir()
			m := mustManager(t, dir, 0)
			r, err := m.Open("b", testBind, newSrc(1<<20, 0), 0)
			if err != nil {
				t.Fatal(err)
			}
			r.Close()
			bm := filepath.Join(dir, "b", "bitmap")
			f, err := os.OpenFile(bm, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			var v [8]byte
			binary.LittleEndian.PutUint64(v[:], uint64(bad))
			f.WriteAt(v[:], pbitmap.UnitSizeOffset)
			f.Close()
			r, err = openNoPanic(m, newSrc(1<<20, 0))
			if err == nil {
				r.Close()
				t.Fatal("a cache with a damaged chunk size opened")
			}
			if !errors.Is(err, ErrMismatch) || !errors.Is(err, pbitmap.ErrFormat) ||
				!strings.Contains(err.Error(), bm) || !strings.Contains(err.Error(), fmt.Sprint(bad)) {
				t.Fatalf("damaged chunk size %d: %v", bad, err)
			}
		})
	}
}

// Chunks the bitmap says are present must be in the data file: a data file
// cut short would serve zeroes for them.
func TestDataFileShorterThanBitmap(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	s := newSrc(1<<20, 4)
	r, err := m.Open("b", testBind, s, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, r)
	r.Close()
	data := filepath.Join(dir, "b", "data")
	os.Truncate(data, 300<<10)
	r, err = m.Open("b", testBind, newSrc(1<<20, 4), 0)
	if err == nil {
		got := readAll(t, r)
		r.Close()
		t.Fatalf("a cache with a short data file opened (serves the right bytes: %v)", bytes.Equal(got, s.Bytes()))
	}
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), data) || !strings.Contains(err.Error(), fmt.Sprint(300<<10)) {
		t.Fatalf("short data file: %v", err)
	}
}

// A crash during creation can leave the bitmap without a sized data file;
// it holds no chunks, so the cache is still good.
func TestEmptyBitmapWithoutData(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	r, err := m.Open("b", testBind, newSrc(1<<20, 5), 0)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	os.Remove(filepath.Join(dir, "b", "data"))
	s := newSrc(1<<20, 5)
	if r, err = m.Open("b", testBind, s, 0); err != nil {
		t.Fatalf("empty cache without data file: %v", err)
	}
	defer r.Close()
	if !bytes.Equal(readAll(t, r), s.Bytes()) {
		t.Fatal("wrong bytes")
	}
}
