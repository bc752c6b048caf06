package cow

import (
	"fmt"
	"io"
	"syscall"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"golang.org/x/sys/unix"
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
	return &asyncDev{Dev: d, base: base, store: rc, mem: memFS(rc)}
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
	if readNow(a.store, a.mem, p, off) {
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

// memFS reports whether the file lives in memory (tmpfs, ramfs), where a
// read never waits for a disk: there RWF_NOWAIT is refused, and not needed.
func memFS(rc syscall.RawConn) bool {
	var st unix.Statfs_t
	var err error
	if cerr := rc.Control(func(fd uintptr) { err = unix.Fstatfs(int(fd), &st) }); cerr != nil || err != nil {
		return false
	}
	return st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC
}

// readNow reads all of p at off if it can without waiting for a disk
// (the page cache has it, or the file is in memory). false: it could not,
// or the read failed; the caller reads again on a goroutine of its own.
// The read holds a reference on the file's descriptor (RawConn.Control,
// as os.File.ReadAt does; RawConn.Read would serialize readers), so a file
// closed meanwhile is an error, never another file that got its number.
func readNow(rc syscall.RawConn, mem bool, p []byte, off int64) bool {
	ok := false
	err := rc.Control(func(fd uintptr) {
		var n int
		var err error
		if mem {
			n, err = unix.Pread(int(fd), p, off)
		} else {
			n, err = unix.Preadv2(int(fd), [][]byte{p}, off, unix.RWF_NOWAIT)
		}
		ok = err == nil && n == len(p)
	})
	return err == nil && ok
}
