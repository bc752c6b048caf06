package iscsi

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/tgt"
)

type asyncRead struct {
	buf []byte
	off int64
	err error
}

// startReads starts the reads on the asynchronous path, unplugs every
// batch of 16, and waits for all of them.
func startReads(t *testing.T, d *Dev, reads []*asyncRead) {
	t.Helper()
	var wg sync.WaitGroup
	for i, r := range reads {
		wg.Add(1)
		d.ReadAtAsync(r.buf, r.off, func(err error) {
			r.err = err
			wg.Done()
		})
		if i%16 == 15 {
			d.Unplug()
		}
	}
	d.Unplug()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("asynchronous reads did not finish")
	}
}

// Held and unplugged reads, aligned or not (those take the synchronous
// path), come back byte-exact.
func TestReadAtAsyncByteExact(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 16 << 20})
	want, err := os.ReadFile(tg.BackingFile)
	if err != nil {
		t.Fatal(err)
	}
	d := openT(t, specOf(tg))
	rng := rand.New(rand.NewPCG(3, 4))
	var reads []*asyncRead
	for i := 0; i < 500; i++ {
		n := (rng.Int64N(64) + 1) * 4096
		if i%10 == 0 {
			n = 2<<20 + 512 // split over several commands
		}
		off := rng.Int64N(int64(len(want))-n) / 512 * 512
		if i%7 == 0 {
			off++ // unaligned
		}
		reads = append(reads, &asyncRead{buf: make([]byte, n), off: off})
	}
	startReads(t, d, reads)
	for _, r := range reads {
		if r.err != nil {
			t.Fatalf("read %d at %d: %v", len(r.buf), r.off, r.err)
		}
		if !bytes.Equal(r.buf, want[r.off:r.off+int64(len(r.buf))]) {
			t.Fatalf("read %d at %d differs from the LUN", len(r.buf), r.off)
		}
	}
	// Out of range and after Close: an error, never a hang.
	bad := []*asyncRead{{buf: make([]byte, 4096), off: int64(len(want))}}
	startReads(t, d, bad)
	if !errors.Is(bad[0].err, blockdev.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", bad[0].err)
	}
	d.Close()
	closed := []*asyncRead{{buf: make([]byte, 4096), off: 0}}
	startReads(t, d, closed)
	if !errors.Is(closed[0].err, ErrClosed) {
		t.Fatalf("read after close: %v", closed[0].err)
	}
}

// Asynchronous reads in flight when their portal dies are retried on the
// other portal: no error reaches the reader.
func TestReadAtAsyncFailover(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 16 << 20, Portals: 2})
	want, _ := os.ReadFile(tg.BackingFile)
	s := specOf(tg)
	s.RetryTimeout = 20 * time.Second
	d := openT(t, s)
	var reads []*asyncRead
	for off := int64(0); off < int64(len(want)); off += 64 << 10 {
		reads = append(reads, &asyncRead{buf: make([]byte, 64<<10), off: off})
	}
	killed := make(chan struct{})
	go func() {
		time.Sleep(5 * time.Millisecond)
		tg.KillPortal(0)
		close(killed)
	}()
	for pass := 0; pass < 4; pass++ {
		startReads(t, d, reads)
		for _, r := range reads {
			if r.err != nil {
				t.Fatalf("pass %d: read at %d: %v", pass, r.off, r.err)
			}
			if !bytes.Equal(r.buf, want[r.off:r.off+int64(len(r.buf))]) {
				t.Fatalf("pass %d: read at %d differs", pass, r.off)
			}
		}
	}
	<-killed
}
