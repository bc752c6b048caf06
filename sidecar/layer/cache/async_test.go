package cache

import (
	"bytes"
	"errors"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// heldSrc is a test source with an asynchronous read path that behaves
// like the iSCSI origin's: a started read waits until Unplug, then ends on
// the source's own goroutine.
type heldSrc struct {
	*src
	mu   sync.Mutex
	held []func()
}

func (h *heldSrc) ReadAtAsync(p []byte, off int64, done func(error)) {
	h.mu.Lock()
	h.held = append(h.held, func() {
		_, err := h.src.ReadAt(p, off)
		done(err)
	})
	h.mu.Unlock()
}

func (h *heldSrc) Unplug() {
	h.mu.Lock()
	held := h.held
	h.held = nil
	h.mu.Unlock()
	if len(held) > 0 {
		go func() {
			for _, f := range held {
				f()
			}
		}()
	}
}

func openHeld(t *testing.T, size int, chunk int64) (*Ref, *heldSrc, blockdev.AsyncReader) {
	t.Helper()
	h := &heldSrc{src: newSrc(size, 7)}
	r, err := mustManager(t, t.TempDir(), 0).Open("b", testBind, h, chunk)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	a := blockdev.AsyncOf(r)
	if a == nil {
		t.Fatal("no asynchronous path over a source that has one")
	}
	return r, h, a
}

// readAsync reads through a and waits, as the NBD server does: start,
// Unplug before waiting.
func readAsync(a blockdev.AsyncReader, p []byte, off int64) error {
	errc := make(chan error, 1)
	a.ReadAtAsync(p, off, func(err error) { errc <- err })
	a.Unplug()
	select {
	case err := <-errc:
		return err
	case <-time.After(10 * time.Second):
		return errors.New("read never ended")
	}
}

func TestAsyncPathOnlyOverAsyncSource(t *testing.T) {
	r, err := mustManager(t, t.TempDir(), 0).Open("b", testBind, newSrc(1<<20, 0), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if a := blockdev.AsyncOf(r); a != nil {
		t.Fatalf("asynchronous path %T over a synchronous source", a)
	}
}

// Reads of every shape, many in flight from several goroutines, return
// the source's bytes; each chunk is fetched once; a second pass is all
// hits and fetches nothing.
func TestAsyncReadsMatchSource(t *testing.T) {
	const size, chunk = 1 << 20, 64 << 10
	r, h, a := openHeld(t, size, chunk)
	want := make([]byte, size)
	h.src.Dev.ReadAt(want, 0)
	for pass := 0; pass < 2; pass++ {
		var wg sync.WaitGroup
		errc := make(chan error, 1000)
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func(seed int64) {
				defer wg.Done()
				rng := rand.New(rand.NewSource(seed))
				for batch := 0; batch < 20; batch++ {
					var bw sync.WaitGroup
					for i := 0; i < 16; i++ {
						n := []int{512, 4096, 4096, 8192, 100_000}[rng.Intn(5)]
						off := rng.Int63n(size - int64(n))
						if rng.Intn(2) == 0 {
							off &^= 4095
						}
						p := make([]byte, n)
						bw.Add(1)
						a.ReadAtAsync(p, off, func(err error) {
							defer bw.Done()
							if err == nil && !bytes.Equal(p, want[off:off+int64(n)]) {
								err = errors.New("wrong bytes")
							}
							if err != nil {
								errc <- err
							}
						})
					}
					a.Unplug()
					bw.Wait()
				}
			}(int64(pass*10 + g))
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Fatal(err)
		}
		// Stores run after the replies: wait for the chunk locks.
		for c := int64(0); c < size/chunk; c++ {
			r.locks.unlock(c, r.locks.lock(c))
		}
		st := r.Stats()
		if int64(h.reads.Load()) > st.Chunks || st.Fills != uint64(st.ChunksPresent) {
			t.Fatalf("pass %d: %d source reads, stats %+v", pass, h.reads.Load(), st)
		}
	}
	before := h.reads.Load()
	if err := readAsync(a, make([]byte, size), 0); err != nil {
		t.Fatal(err)
	}
	if got := h.reads.Load() - before; got != 0 && r.Stats().ChunksPresent == r.Stats().Chunks {
		t.Fatalf("a read of a full cache fetched %d times", got)
	}
	if fromCache, _ := r.Tally(); fromCache == 0 {
		t.Fatal("hits not counted for the reference")
	}
}

// A fill in flight holds the chunk's lock: a synchronous fill of the same
// chunk waits for it, and the chunk is fetched once.
func TestAsyncFillHoldsChunkLock(t *testing.T) {
	r, h, a := openHeld(t, 1<<20, 64<<10)
	p := make([]byte, 4096)
	errc := make(chan error, 1)
	a.ReadAtAsync(p, 8192, func(err error) { errc <- err })
	syncDone := make(chan error, 1)
	go func() {
		_, err := r.ReadAt(make([]byte, 4096), 0)
		syncDone <- err
	}()
	select {
	case err := <-syncDone:
		t.Fatalf("synchronous read of a chunk being filled did not wait: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	a.Unplug()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if err := <-syncDone; err != nil {
		t.Fatal(err)
	}
	if n := h.reads.Load(); n != 1 {
		t.Fatalf("chunk fetched %d times", n)
	}
	// A read of a chunk being filled waits for it rather than fetching.
	a.ReadAtAsync(p, 64<<10, func(err error) { errc <- err })
	if err := readAsync(a, make([]byte, 4096), 64<<10+4096); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if n := h.reads.Load(); n != 2 {
		t.Fatalf("two chunks fetched %d times", n)
	}
}

// A failed fill is the read's error and leaves the chunk to a later fill.
func TestAsyncFillError(t *testing.T) {
	r, h, a := openHeld(t, 1<<20, 64<<10)
	h.broken.Store(true)
	err := readAsync(a, make([]byte, 4096), 0)
	if !errors.Is(err, errOriginDown) {
		t.Fatalf("read with the origin down: %v", err)
	}
	h.broken.Store(false)
	p := make([]byte, 4096)
	if err := readAsync(a, p, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4096)
	h.src.Dev.ReadAt(want, 0)
	if !bytes.Equal(p, want) {
		t.Fatal("wrong bytes after a failed fill")
	}
	r.locks.unlock(0, r.locks.lock(0))
	if !r.Present(0) {
		t.Fatal("chunk not cached after the second fill")
	}
	if err := readAsync(a, make([]byte, 4096), 1<<20); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
}
