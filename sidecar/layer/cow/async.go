package cow

import (
	"fmt"
	"io"
	"syscall"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
)

// The asynchronous read path (blockdev.AsyncReader), so an export over a
// remote origin keeps its reads off parked goroutines through the cow
// layer: a read wholly outside the store goes to the base's asynchronous
// path; one wholly in the store is read at once when that cannot wait for
// a disk (RWF_NOWAIT, or a store in memory; done runs before ReadAtAsync
// returns) or else on a goroutine; a read that straddles both runs ReadAt
// on a goroutine.
//
// The path exists when the base has one: Unwrap returns it for
// blockdev.AsyncOf, nil otherwise (the NBD server then keeps its workers).

// asyncDev is a Dev seen through its asynchronous read path. Every other
// call goes to the Dev.
type asyncDev struct {
	*Dev
	base  blockdev.AsyncReader
	store syscall.RawConn
	mem   bool // the store is in memory (memFS)
}

// Unwrap returns the device's asynchronous read path, or nil when its base
// has none.
func (d *Dev) Unwrap() blockdev.Device {
	base := blockdev.AsyncOf(d.base)
	if base == nil {
		return nil
	}
	rc, err := d.store.SyscallConn()
	if err != nil {
		return nil
	}
	return &asyncDev{Dev: d, base: base, store: rc, mem: fsutil.InMemory(rc)}
}

func (a *asyncDev) Unplug() { a.base.Unplug() }

func (a *asyncDev) ReadAtAsync(p []byte, off int64, done func(error)) {
	d := a.Dev
	if err := blockdev.CheckRange(d.size, off, int64(len(p))); err != nil {
		done(err)
		return
	}
	if len(p) == 0 {
		done(nil)
		return
	}
	first, last := off/d.cl, (off+int64(len(p))-1)/d.cl
	inStore := d.bits.Get(first)
	for c := first + 1; c <= last; c++ {
		if d.bits.Get(c) != inStore {
			go func() {
				_, err := d.ReadAt(p, off)
				done(err)
			}()
			return
		}
	}
	if !inStore {
		a.base.ReadAtAsync(p, off, done)
		return
	}
	if fsutil.ReadNow(a.store, a.mem, p, off) {
		done(nil)
		return
	}
	go func() {
		_, err := d.store.ReadAt(p, off)
		if err == io.EOF {
			err = fmt.Errorf("%w: cow store %s ends before %d", blockdev.ErrShortIO, d.path, off+int64(len(p)))
		}
		done(err)
	}()
}
