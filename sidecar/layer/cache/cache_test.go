package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// src is a test source: counts reads, can be slowed down or broken.
type src struct {
	*memdev.Dev
	reads  atomic.Int64
	delay  atomic.Int64 // ns
	broken atomic.Bool
	closed atomic.Int32
}

var errOriginDown = errors.New("origin is down")

func newSrc(size int, seed byte) *src {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i/4096) ^ byte(i*13) ^ seed
	}
	return &src{Dev: memdev.FromBytes(b, false)}
}

func (s *src) ReadAt(p []byte, off int64) (int, error) {
	s.reads.Add(1)
	if s.broken.Load() {
		return 0, errOriginDown
	}
	time.Sleep(time.Duration(s.delay.Load()))
	return s.Dev.ReadAt(p, off)
}

func (s *src) Close() error { s.closed.Add(1); return nil }

func mustManager(t *testing.T, dir string, budget int64) *Manager {
	t.Helper()
	m, err := NewManager(dir, budget)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func readAll(t *testing.T, d blockdev.Device) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	for off := int64(0); off < d.Size(); off += 100_000 {
		n := min(100_000, d.Size()-off)
		if _, err := d.ReadAt(b[off:off+n], off); err != nil {
			t.Fatalf("read %d+%d: %v", off, n, err)
		}
	}
	return b
}

func TestSingleFetchPerChunk(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	s := newSrc(1<<20, 1)
	s.delay.Store(int64(50 * time.Millisecond))
	r, err := m.Open("b", testBind, s, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p := make([]byte, 1000)
			if _, err := r.ReadAt(p, int64(70000+i*100)); err != nil {
				t.Error(err)
			}
			if !bytes.Equal(p, s.Bytes()[70000+i*100:][:1000]) {
				t.Error("wrong bytes")
			}
		}(i)
	}
	wg.Wait()
	if n := s.reads.Load(); n != 1 {
		t.Fatalf("16 concurrent misses on one chunk made %d source reads, want 1", n)
	}
	st := r.Stats()
	if st.Fills != 1 || st.BytesFromSource != 64<<10 || st.Hits+st.Misses != 16 || st.BytesFromCache != 16000 {
		t.Fatalf("stats %+v", st)
	}
}

func TestReuseAfterRestartAndWarmWithoutOrigin(t *testing.T) {
	dir := t.TempDir()
	size := 3<<20 + 777
	s := newSrc(size, 2)
	m := mustManager(t, dir, 0)
	r, err := m.Open("tmpl", testBind, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	var last, calls atomic.Int64
	if err := r.Warm(context.Background(), func(done, total int64) {
		calls.Add(1)
		if total != int64(size) || done < last.Load() {
			t.Errorf("progress %d/%d after %d", done, total, last.Load())
		}
		last.Store(done)
	}); err != nil {
		t.Fatal(err)
	}
	if last.Load() != int64(size) || calls.Load() < 5 {
		t.Fatalf("progress ended at %d after %d calls", last.Load(), calls.Load())
	}
	if st := r.Stats(); st.ChunksPresent != st.Chunks || st.BytesPresent != int64(size) {
		t.Fatalf("after warm: %+v", st)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if s.closed.Load() != 1 {
		t.Fatal("source not closed with the last reference")
	}

	// Restart with the origin down: everything is served from the cache.
	dead := newSrc(size, 2)
	dead.broken.Store(true)
	m = mustManager(t, dir, 0)
	r, err = m.Open("tmpl", testBind, dead, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.ChunkSize() != DefaultChunkSize {
		t.Fatalf("chunk size %d", r.ChunkSize())
	}
	if got := readAll(t, r); !bytes.Equal(got, s.Bytes()) {
		t.Fatal("warm cache served wrong bytes")
	}
	if dead.reads.Load() != 0 {
		t.Fatalf("warm cache asked the origin %d times", dead.reads.Load())
	}
	if st := r.Stats(); st.Misses != 0 || st.Fills != 0 || st.BytesFromCache != uint64(size) {
		t.Fatalf("stats %+v", st)
	}
}

func TestMissWithOriginDownIsAnError(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	s := newSrc(1<<20, 3)
	s.broken.Store(true)
	r, _ := m.Open("b", testBind, s, 0)
	defer r.Close()
	if _, err := r.ReadAt(make([]byte, 10), 0); !errors.Is(err, errOriginDown) || !strings.Contains(err.Error(), "fill chunk 0") {
		t.Fatalf("miss with the origin down: %v", err)
	}
	s.broken.Store(false)
	if _, err := r.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatalf("after the origin came back: %v", err)
	}
}

func TestMismatch(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	r, err := m.Open("b", testBind, newSrc(1<<20, 0), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Open("b", testBind, newSrc(1<<20, 0), 128<<10); !errors.Is(err, ErrMismatch) {
		t.Fatalf("open base with another chunk size: %v", err)
	}
	r.Close()
	for _, c := range []struct {
		size  int
		chunk int64
		want  string
	}{
		{2 << 20, 0, "holds a base of 1048576 bytes, but its origin now has 2097152"},
		{1 << 20, 4096, "has chunk size 65536, asked for 4096"},
	} {
		_, err := m.Open("b", testBind, newSrc(c.size, 0), c.chunk)
		if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("error %v, want %q", err, c.want)
		}
	}
	r, err = m.Open("b", testBind, newSrc(1<<20, 0), 0) // 0 adopts
	if err != nil || r.ChunkSize() != 64<<10 {
		t.Fatalf("chunk 0 did not adopt: %v", err)
	}
	r.Close()
	os.Truncate(filepath.Join(dir, "b", "bitmap"), 4100)
	if _, err := m.Open("b", testBind, newSrc(1<<20, 0), 0); err == nil || !strings.Contains(err.Error(), "remove the directory") {
		t.Fatalf("corrupt bitmap: %v", err)
	}
	if err := m.Remove("b"); err != nil {
		t.Fatal(err)
	}
	if r, err = m.Open("b", testBind, newSrc(1<<20, 0), 0); err != nil {
		t.Fatalf("rebuild after remove: %v", err)
	}
	r.Close()
}

func TestOneProcessPerCache(t *testing.T) {
	dir := t.TempDir()
	r, err := mustManager(t, dir, 0).Open("b", testBind, newSrc(1<<20, 0), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// A second manager stands for another process (flock is per open file).
	_, err = mustManager(t, dir, 0).Open("b", testBind, newSrc(1<<20, 0), 0)
	if err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second user of one cache dir: %v", err)
	}
}

func TestEvictionLRUNeverInUse(t *testing.T) {
	dir := t.TempDir()
	const mb = 1 << 20
	m := mustManager(t, dir, 2*mb+mb/2)
	warm := func(id string) *Ref {
		r, err := m.Open(id, testBind, newSrc(mb, 0), 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Warm(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		return r
	}
	// a, b, c used in that order; a is in use throughout.
	a := warm("a")
	defer a.Close()
	warm("b").Close()
	time.Sleep(20 * time.Millisecond)
	warm("c").Close()
	time.Sleep(20 * time.Millisecond)
	m.Evict()
	ids := map[string]bool{}
	list, _ := m.List()
	var total int64
	for _, inf := range list {
		ids[inf.ID] = true
		total += inf.BytesOnDisk
	}
	if !ids["a"] || ids["b"] || !ids["c"] {
		t.Fatalf("after eviction: %v; want a (in use) and c (most recent), not b", ids)
	}
	if total > 2*mb+mb/2 {
		t.Fatalf("%d bytes cached, budget %d", total, 2*mb+mb/2)
	}
	// Going over with only in-use bases evicts nothing in use.
	d := warm("d")
	defer d.Close()
	m.Evict()
	if _, err := os.Stat(filepath.Join(dir, "a", "data")); err != nil {
		t.Fatal("a base in use was evicted")
	}
	if got := readAll(t, a); !bytes.Equal(got, newSrc(mb, 0).Bytes()) {
		t.Fatal("in-use base corrupted by eviction")
	}
	if err := m.Remove("a"); !errors.Is(err, ErrInUse) {
		t.Fatalf("remove in use: %v", err)
	}
}

func TestPrefetchAndReadOnly(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	s := newSrc(1<<20, 5)
	r, _ := m.Open("b", testBind, s, 64<<10)
	defer r.Close()
	if err := r.Prefetch(100_000, 200_000); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.ChunksPresent != 4 || st.Fills != 4 {
		t.Fatalf("prefetch of chunks 1..4: %+v", st)
	}
	if _, err := r.WriteAt([]byte{1}, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatal("write to the base cache did not fail read-only")
	}
	if err := r.Prefetch(1<<20, 1); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("prefetch past the end: %v", err)
	}
}

// A fill racing a write-through of the same chunk must not bring back
// the old bytes: the fill reads slowly, the write lands meanwhile.
func TestWriteThroughNoStaleFill(t *testing.T) {
	dir := t.TempDir()
	m := mustManager(t, dir, 0)
	s := newSrc(1<<20, 6)
	r, _ := m.Open("vol", testBind, s, 64<<10)
	for round := 0; round < 20; round++ {
		off := int64(round) * 40000
		s.delay.Store(int64(20 * time.Millisecond))
		done := make(chan error)
		go func() {
			_, err := r.ReadAt(make([]byte, 10), off)
			done <- err
		}()
		time.Sleep(5 * time.Millisecond)
		s.delay.Store(0)
		msg := []byte(fmt.Sprintf("round %d", round))
		if _, err := r.WriteThrough(msg, off+3); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		r.ReadAt(got, off+3)
		if !bytes.Equal(got, msg) {
			t.Fatalf("round %d: read %q after write-through, want %q", round, got, msg)
		}
	}
	if st := r.Stats(); st.Invalidations == 0 {
		t.Fatalf("no cached chunk was updated: %+v", st)
	}
	// Zero-through drops chunks; everything still matches the source.
	if err := r.ZeroThrough(1000, 300_000, false); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(s.Bytes())
	if got := readAll(t, r); !bytes.Equal(got, want) {
		t.Fatal("cache and source differ after write-through")
	}
	r.Close()
	r, _ = mustManager(t, dir, 0).Open("vol", testBind, s, 0)
	defer r.Close()
	if got := readAll(t, r); !bytes.Equal(got, want) {
		t.Fatal("cache and source differ after reopen")
	}
}

// The hot path does not allocate.
func TestHitAllocs(t *testing.T) {
	m := mustManager(t, t.TempDir(), 0)
	r, _ := m.Open("b", testBind, newSrc(1<<20, 0), 0)
	defer r.Close()
	p := make([]byte, 4096)
	r.ReadAt(p, 8192)
	if n := testing.AllocsPerRun(100, func() { r.ReadAt(p, 8192) }); n != 0 {
		t.Fatalf("a cache hit allocates %v times", n)
	}
}

func BenchmarkHit4K(b *testing.B) {
	m, _ := NewManager(b.TempDir(), 0)
	r, _ := m.Open("b", testBind, newSrc(16<<20, 0), 0)
	defer r.Close()
	r.Warm(context.Background(), nil)
	p := make([]byte, 4096)
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		r.ReadAt(p, int64(i%4000)*4096)
	}
}

// testBind is a template generation: its cache is kept across opens, as
// most tests here need.
var testBind = Binding{Template: "t", Generation: "1", Origin: "test:src"}
