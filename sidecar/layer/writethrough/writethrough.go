// Package writethrough is the writable layer of a persistent Cinder volume:
// reads come from the base cache, writes go to the origin and are
// acknowledged only once it has them; FLUSH (and FUA, which the NBD server
// maps to Flush) is the origin's Flush. Keeping the cache correct is the
// cache's job (cache.Base.WriteThrough/ZeroThrough), under the same
// per-chunk locks as its fills, so no fill can bring stale data back.
package writethrough

import (
	"fmt"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// Cache is what this layer needs of the cache below: cache.Ref has it.
type Cache interface {
	blockdev.Device
	Source() blockdev.Device
	WriteThrough(p []byte, off int64) (int, error)
	ZeroThrough(off, length int64, trim bool) error
	FlushSource() error
}

// Dev is a write-through device. Close closes the cache reference below.
type Dev struct {
	blockdev.Forward
	c Cache
}

// New stacks write-through on c. The cache's source must be writable.
func New(c Cache) (*Dev, error) {
	if c.Source().Caps().ReadOnly {
		return nil, fmt.Errorf("%w: write-through needs a writable origin, but the base's source is open read-only", blockdev.ErrReadOnly)
	}
	return &Dev{Forward: blockdev.Forward{Next: c}, c: c}, nil
}

func (d *Dev) WriteAt(p []byte, off int64) (int, error) { return d.c.WriteThrough(p, off) }
func (d *Dev) Flush() error                             { return d.c.FlushSource() }

func (d *Dev) Trim(off, length int64) error {
	if !d.c.Source().Caps().Trim {
		return blockdev.ErrUnsupported
	}
	return d.c.ZeroThrough(off, length, true)
}

func (d *Dev) WriteZeroes(off, length int64) error {
	if d.c.Source().Caps().WriteZeroes {
		return d.c.ZeroThrough(off, length, false)
	}
	return blockdev.ZeroFill(d, off, length)
}

func (d *Dev) Caps() blockdev.Caps {
	c := d.c.Caps()
	s := d.c.Source().Caps()
	c.ReadOnly = false
	c.Flush = true
	c.Trim = s.Trim
	c.WriteZeroes = true
	c.FastZero = s.FastZero && s.WriteZeroes
	return c
}
