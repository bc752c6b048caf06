// Package blockdev is the one interface every layer of the data path
// implements: a sized, random-access block device. An export is a stack of
// Devices, each wrapping the one below, in the manner of nbdkit's plugins and
// filters. A layer that has nothing to add for an operation forwards it.
package blockdev

import (
	"errors"
	"fmt"
)

// Device is a block device. Every method must be safe for concurrent use:
// the NBD server issues requests from one connection in parallel.
type Device interface {
	// ReadAt and WriteAt follow io.ReaderAt/io.WriterAt, except that a short
	// transfer is always an error (never a silent short read).
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the device size in bytes. It may change after Resize-like
	// operations on the origin; callers re-read it rather than cache it.
	Size() int64
	// Flush makes every write acknowledged so far durable.
	Flush() error
	// Trim says the range is no longer needed; later reads may return
	// anything that was written or zeroes. Layers that cannot trim return
	// ErrUnsupported.
	Trim(off, length int64) error
	// WriteZeroes makes the range read back as zeroes. It leaves the range
	// allocated (NBD's NO_HOLE holds by default); Trim is what deallocates.
	WriteZeroes(off, length int64) error
	// BlockStatus describes [off, off+length) as a run of extents. It may
	// describe less than asked (at least one extent) but never more.
	BlockStatus(off, length int64) ([]Extent, error)
	// Prefetch asks the device to bring the range close (NBD_CMD_CACHE);
	// it returns when the data is local or the device has nothing to do.
	Prefetch(off, length int64) error
	// Caps says what the device supports; the NBD server advertises it.
	Caps() Caps
	// Close releases the device. It does not close devices it wraps unless
	// it owns them (documented per layer).
	Close() error
}

// AsyncReader is a Device that can start a read and report its end later,
// so a server need not park a goroutine per read in flight (the origin
// that talks to a remote target is one). done runs on the device's own
// goroutine, or on the caller's before ReadAtAsync returns (a read the
// device can answer at once), and must not block. A started read may wait until Unplug, so
// that reads started together reach the target together; a caller that
// is about to wait for anything calls Unplug first.
type AsyncReader interface {
	ReadAtAsync(p []byte, off int64, done func(error))
	Unplug()
}

// Unwrapper is a wrapper that passes every call straight to the device it
// returns (or to a view of itself with the same answers), so that
// device's optional interfaces apply through it. Unwrap may return nil:
// nothing below offers more.
type Unwrapper interface {
	Unwrap() Device
}

// AsyncOf returns d's asynchronous read path, looking through pure
// wrappers, or nil when reads must be run synchronously.
func AsyncOf(d Device) AsyncReader {
	for d != nil {
		if a, ok := d.(AsyncReader); ok {
			return a
		}
		u, ok := d.(Unwrapper)
		if !ok {
			return nil
		}
		d = u.Unwrap()
	}
	return nil
}

// Caps describes what a Device supports.
type Caps struct {
	ReadOnly    bool
	Flush       bool
	Trim        bool
	WriteZeroes bool
	// FastZero: WriteZeroes is cheap (metadata only).
	FastZero    bool
	BlockStatus bool
	Prefetch    bool
	// MultiConn: writes flushed on one connection are visible to reads on
	// every other connection of the same export.
	MultiConn bool
	// Block size constraints in bytes; zero means "no preference".
	MinBlock       uint32
	PreferredBlock uint32
	MaxBlock       uint32
}

// Extent flags, the same bits as NBD's base:allocation context.
const (
	ExtentHole uint32 = 1 << 0 // not allocated
	ExtentZero uint32 = 1 << 1 // reads as zeroes
)

// Extent is one run of BlockStatus.
type Extent struct {
	Length int64
	Flags  uint32
}

// Errors a layer returns so the NBD server can answer with the right errno.
// Wrap them with %w to add the cause: errors.Is still finds them.
var (
	ErrReadOnly    = errors.New("device is read-only")          // EPERM
	ErrOutOfRange  = errors.New("request beyond end of device") // EINVAL
	ErrUnsupported = errors.New("operation not supported")      // EINVAL (ENOTSUP with structured replies)
	ErrNoSpace     = errors.New("no space left")                // ENOSPC
	ErrInvalid     = errors.New("invalid request")              // EINVAL
	ErrShortIO     = errors.New("short transfer")               // EIO
)

// CheckRange returns ErrOutOfRange (with the numbers) when [off, off+length)
// is not inside a device of the given size.
func CheckRange(size, off, length int64) error {
	if off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("%w: offset %d length %d, device size %d", ErrOutOfRange, off, length, size)
	}
	return nil
}

// Forward is a layer that passes every call to Next. Embed it in a layer
// and override only what the layer changes.
type Forward struct{ Next Device }

func (f Forward) ReadAt(p []byte, off int64) (int, error)  { return f.Next.ReadAt(p, off) }
func (f Forward) WriteAt(p []byte, off int64) (int, error) { return f.Next.WriteAt(p, off) }
func (f Forward) Size() int64                              { return f.Next.Size() }
func (f Forward) Flush() error                             { return f.Next.Flush() }
func (f Forward) Trim(off, length int64) error             { return f.Next.Trim(off, length) }
func (f Forward) WriteZeroes(off, length int64) error      { return f.Next.WriteZeroes(off, length) }
func (f Forward) BlockStatus(off, length int64) ([]Extent, error) {
	return f.Next.BlockStatus(off, length)
}
func (f Forward) Prefetch(off, length int64) error { return f.Next.Prefetch(off, length) }
func (f Forward) Caps() Caps                       { return f.Next.Caps() }
func (f Forward) Close() error                     { return f.Next.Close() }

// ZeroFill writes zeroes over [off, off+length) with WriteAt, in pieces of
// at most 1 MiB; for layers whose store has no cheaper way.
func ZeroFill(d interface {
	WriteAt([]byte, int64) (int, error)
}, off, length int64) error {
	const piece = 1 << 20
	buf := make([]byte, min(length, piece))
	for length > 0 {
		n := min(length, piece)
		if _, err := d.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}
