// Package file is the path origin: a regular file or a block device.
package file

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"golang.org/x/sys/unix"
)

// ErrNotADisk is an origin path that is neither a regular file nor a block
// device (a directory, a character device such as /dev/null, a socket).
var ErrNotADisk = errors.New("neither a regular file nor a block device")

// Dev is a file or block device read and written with pread/pwrite.
type Dev struct {
	f        *os.File
	size     atomic.Int64
	readOnly bool
	blockDev bool
}

// Open opens path. A block device's size comes from seeking to its end.
func Open(path string, readOnly bool) (*Dev, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, fmt.Errorf("open origin %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat origin %s: %w", path, err)
	}
	d := &Dev{f: f, readOnly: readOnly}
	switch {
	case st.Mode().IsRegular():
		d.size.Store(st.Size())
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		d.blockDev = true
		end, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("size of block device %s: %w", path, err)
		}
		d.size.Store(end)
	default:
		f.Close()
		return nil, fmt.Errorf("origin %s: %w", path, ErrNotADisk)
	}
	return d, nil
}

func (d *Dev) Size() int64 { return d.size.Load() }

func (d *Dev) ReadAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(d.Size(), off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF && n < len(p) {
		return n, fmt.Errorf("%w: read %d of %d bytes at %d", blockdev.ErrShortIO, n, len(p), off)
	}
	return n, err
}

func (d *Dev) WriteAt(p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.f.WriteAt(p, off)
	if err != nil && isNoSpace(err) {
		return n, fmt.Errorf("%w: %v", blockdev.ErrNoSpace, err)
	}
	return n, err
}

func (d *Dev) Flush() error { return d.f.Sync() }

// Trim punches a hole (a regular file) or issues BLKDISCARD (a block device).
func (d *Dev) Trim(off, length int64) error {
	if d.readOnly {
		return blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	if d.blockDev {
		r := [2]uint64{uint64(off), uint64(length)}
		return ioctlRange(d.f, unix.BLKDISCARD, r)
	}
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// WriteZeroes uses FALLOC_FL_ZERO_RANGE / BLKZEROOUT and falls back to
// writing zeroes.
func (d *Dev) WriteZeroes(off, length int64) error {
	if d.readOnly {
		return blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	var err error
	if d.blockDev {
		err = ioctlRange(d.f, unix.BLKZEROOUT, [2]uint64{uint64(off), uint64(length)})
	} else {
		err = unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	if err == nil {
		return nil
	}
	return blockdev.ZeroFill(d, off, length)
}

// BlockStatus reports holes of a sparse regular file with SEEK_DATA/SEEK_HOLE.
func (d *Dev) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return nil, err
	}
	if d.blockDev || length == 0 {
		return []blockdev.Extent{{Length: length}}, nil
	}
	end := off + length
	fd := int(d.f.Fd())
	var out []blockdev.Extent
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil || data >= end { // ENXIO: only a hole remains
			out = append(out, blockdev.Extent{Length: end - pos, Flags: blockdev.ExtentHole | blockdev.ExtentZero})
			break
		}
		if data > pos {
			out = append(out, blockdev.Extent{Length: data - pos, Flags: blockdev.ExtentHole | blockdev.ExtentZero})
			pos = data
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		out = append(out, blockdev.Extent{Length: hole - pos})
		pos = hole
	}
	return out, nil
}

func (d *Dev) Prefetch(off, length int64) error {
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	return unix.Fadvise(int(d.f.Fd()), off, length, unix.FADV_WILLNEED)
}

func (d *Dev) Caps() blockdev.Caps {
	return blockdev.Caps{ReadOnly: d.readOnly, Flush: !d.readOnly, Trim: !d.readOnly,
		WriteZeroes: !d.readOnly, FastZero: !d.blockDev, BlockStatus: true, Prefetch: true,
		MultiConn: true, MinBlock: 1, PreferredBlock: 4096, MaxBlock: 32 << 20}
}

func (d *Dev) Close() error { return d.f.Close() }

func isNoSpace(err error) bool {
	var errno unix.Errno
	for e := err; e != nil; {
		if x, ok := e.(unix.Errno); ok {
			errno = x
			break
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	return errno == unix.ENOSPC || errno == unix.EDQUOT
}
