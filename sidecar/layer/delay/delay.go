// Package delay is a test layer that sleeps before each read or write, like
// nbdkit's delay filter, so latency-bound behaviour (queue depth, prefetch)
// can be measured against a fast local device.
package delay

import (
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// Dev delays reads by Read and writes (and zeroing/trim) by Write.
type Dev struct {
	blockdev.Forward
	Read, Write time.Duration
}

// New wraps next.
func New(next blockdev.Device, read, write time.Duration) *Dev {
	return &Dev{Forward: blockdev.Forward{Next: next}, Read: read, Write: write}
}

func (d *Dev) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(d.Read)
	return d.Next.ReadAt(p, off)
}

func (d *Dev) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(d.Write)
	return d.Next.WriteAt(p, off)
}

func (d *Dev) WriteZeroes(off, length int64) error {
	time.Sleep(d.Write)
	return d.Next.WriteZeroes(off, length)
}

func (d *Dev) Trim(off, length int64) error {
	time.Sleep(d.Write)
	return d.Next.Trim(off, length)
}
