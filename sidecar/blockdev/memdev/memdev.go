// Package memdev is an in-memory Device for tests and as a reference model.
package memdev

import (
	"sync"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// Dev is a byte slice behind a lock.
type Dev struct {
	mu       sync.RWMutex
	data     []byte
	readOnly bool
}

// New returns a zero-filled device of size bytes.
func New(size int64) *Dev { return &Dev{data: make([]byte, size)} }

// FromBytes wraps b (not copied).
func FromBytes(b []byte, readOnly bool) *Dev { return &Dev{data: b, readOnly: readOnly} }

// Bytes returns the backing slice; callers must not race with writers.
func (d *Dev) Bytes() []byte { return d.data }

func (d *Dev) Size() int64 { return int64(len(d.data)) }

func (d *Dev) ReadAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(d.Size(), off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	return copy(p, d.data[off:]), nil
}

func (d *Dev) WriteAt(p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return copy(d.data[off:], p), nil
}

func (d *Dev) Flush() error { return nil }

func (d *Dev) Trim(off, length int64) error { return d.WriteZeroes(off, length) }

func (d *Dev) WriteZeroes(off, length int64) error {
	if d.readOnly {
		return blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.data[off : off+length])
	return nil
}

func (d *Dev) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return nil, err
	}
	return []blockdev.Extent{{Length: length}}, nil
}

func (d *Dev) Prefetch(off, length int64) error { return blockdev.CheckRange(d.Size(), off, length) }

func (d *Dev) Caps() blockdev.Caps {
	return blockdev.Caps{ReadOnly: d.readOnly, Flush: true, Trim: !d.readOnly, WriteZeroes: !d.readOnly,
		BlockStatus: true, Prefetch: true, MultiConn: true}
}

func (d *Dev) Close() error { return nil }
