package cow

import (
	"bytes"
	"errors"
	"math/rand"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// heldBase is a base with an asynchronous read path like the iSCSI
// origin's: a started read waits until Unplug, then ends on the base's own
// goroutine.
type heldBase struct {
	*memdev.Dev
	mu          sync.Mutex
	held        []func()
	asyncReads  atomic.Int64
	unplugCalls atomic.Int64
}

func (h *heldBase) ReadAtAsync(p []byte, off int64, done func(error)) {
	h.asyncReads.Add(1)
	h.mu.Lock()
	h.held = append(h.held, func() {
		_, err := h.Dev.ReadAt(p, off)
		done(err)
	})
	h.mu.Unlock()
}

func (h *heldBase) Unplug() {
	h.unplugCalls.Add(1)
	h.mu.Lock()
	held := h.held
	h.held = nil
	h.mu.Unlock()
	go func() {
		for _, f := range held {
			f()
		}
	}()
}

func TestAsyncPathOnlyOverAsyncBase(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "vm.cow"), base(1<<20))
	defer d.Close()
	if a := blockdev.AsyncOf(d); a != nil {
		t.Fatalf("asynchronous path %T over a synchronous base", a)
	}
}

// Async reads of every kind (store only, base only, both, unaligned, past
// the end) answer what ReadAt answers; reads of the base go to its
// asynchronous path, and Unplug reaches it.
func TestAsyncReadsMatchReadAt(t *testing.T) {
	const size = 1<<20 + 300
	hb := &heldBase{Dev: base(size)}
	d := open(t, filepath.Join(t.TempDir(), "vm.cow"), hb)
	defer d.Close()
	a := blockdev.AsyncOf(d)
	if a == nil {
		t.Fatal("no asynchronous path over a base that has one")
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{'w'}, 40000), 8192); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(100_000, 50_000); err != nil {
		t.Fatal(err)
	}
	want := read(t, d, 0, size)
	rng := rand.New(rand.NewSource(1))
	type rd struct {
		p   []byte
		off int64
		err chan error
	}
	var rs []rd
	for i := 0; i < 400; i++ {
		n := []int64{512, 4096, 4096, 20000}[rng.Intn(4)]
		off := rng.Int63n(size - n)
		if i%2 == 0 {
			off &^= 4095
		}
		if i < 8 { // the store only, the base only, and across
			off = []int64{8192, 12288, 0, 4096, 200_000, 45000, 100_000, 1<<20 - 20000}[i]
		}
		r := rd{make([]byte, n), off, make(chan error, 1)}
		a.ReadAtAsync(r.p, r.off, func(err error) { r.err <- err })
		rs = append(rs, r)
	}
	a.Unplug()
	for _, r := range rs {
		select {
		case err := <-r.err:
			if err != nil {
				t.Fatalf("read %d+%d: %v", r.off, len(r.p), err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("read %d+%d never ended", r.off, len(r.p))
		}
		if !bytes.Equal(r.p, want[r.off:r.off+int64(len(r.p))]) {
			t.Fatalf("read %d+%d: wrong bytes", r.off, len(r.p))
		}
	}
	if hb.asyncReads.Load() == 0 || hb.unplugCalls.Load() == 0 {
		t.Fatalf("base's asynchronous path unused: %d reads, %d unplugs", hb.asyncReads.Load(), hb.unplugCalls.Load())
	}
	errc := make(chan error, 1)
	a.ReadAtAsync(make([]byte, 4096), size-100, func(err error) { errc <- err })
	if err := <-errc; !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
}
