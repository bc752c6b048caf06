package fsutil

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// InMemory reports whether the file lives in memory (tmpfs, ramfs), where
// a read never waits for a disk: there RWF_NOWAIT is refused, and not
// needed.
func InMemory(rc syscall.RawConn) bool {
	var st unix.Statfs_t
	var err error
	if cerr := rc.Control(func(fd uintptr) { err = unix.Fstatfs(int(fd), &st) }); cerr != nil || err != nil {
		return false
	}
	return st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC
}

// ReadNow reads all of p at off if it can without waiting for a disk (the
// page cache has it, or the file is in memory: mem, from InMemory). false:
// it could not, or the read failed; the caller reads again on a goroutine
// of its own. The read holds a reference on the file's descriptor
// (RawConn.Control, as os.File.ReadAt does; RawConn.Read would serialize
// readers), so a file closed meanwhile is an error, never another file
// that got its number.
func ReadNow(rc syscall.RawConn, mem bool, p []byte, off int64) bool {
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
