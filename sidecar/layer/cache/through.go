package cache

import (
	"fmt"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// The write-through hooks. Each holds the locks of the chunks it touches
// for its whole course, the same locks fills take, so a fill can never read
// the source half-written and store a stale chunk. The order keeps a crash
// harmless at every step:
//
//  1. clear the bits of touched chunks that are present, and make that
//     durable (after it, a restart refetches them);
//  2. write the source (the acknowledgement waits for this);
//  3. write the new bytes into the cache file for chunks that were present
//     (the rest of such a chunk is still equal to the source) or that the
//     write covers whole, and set their bits again: the background commit
//     persists them after an fdatasync of the data, as for any fill.

// maxLockSpan bounds how many chunk locks one call holds at a time.
const maxLockSpan = 256

func (b *Base) lockSpan(first, last int64) {
	for c := first; c <= last; c++ {
		b.locks.lock(c)
	}
}

func (b *Base) unlockSpan(first, last int64) {
	for c := first; c <= last; c++ {
		b.locks.mu.Lock()
		l := b.locks.m[c]
		b.locks.mu.Unlock()
		b.locks.unlock(c, l)
	}
}

// invalidate clears present chunks of [first, last] durably and returns
// which were present (index c-first).
func (b *Base) invalidate(first, last int64) ([]bool, error) {
	was := make([]bool, last-first+1)
	dirty := false
	for c := first; c <= last; c++ {
		if b.bits.Clear(c) {
			was[c-first], dirty = true, true
			b.inval.Add(1)
		}
	}
	if dirty {
		if err := b.Sync(); err != nil {
			return nil, fmt.Errorf("invalidate cached chunks before write-through: %w", err)
		}
	}
	return was, nil
}

// WriteThrough writes p to the source at off and keeps the cache correct.
// It returns once the source has accepted the write; FlushSource makes it
// durable there.
func (b *Base) WriteThrough(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(b.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	for done := 0; done < len(p); {
		// Pieces of at most maxLockSpan chunks, chunk-aligned after the first.
		o := off + int64(done)
		end := min(off+int64(len(p)), (o/b.chunk+maxLockSpan)*b.chunk)
		if err := b.writePiece(p[done:end-off], o); err != nil {
			return done, err
		}
		done = int(end - off)
	}
	b.wt.Add(uint64(len(p)))
	return len(p), nil
}

func (b *Base) writePiece(p []byte, off int64) error {
	end := off + int64(len(p))
	first, last := off/b.chunk, (end-1)/b.chunk
	b.lockSpan(first, last)
	defer b.unlockSpan(first, last)
	if b.degraded.Load() {
		_, err := b.source.WriteAt(p, off)
		return err
	}
	was, err := b.invalidate(first, last)
	if err != nil {
		return err
	}
	if _, err := b.source.WriteAt(p, off); err != nil {
		return err
	}
	for c := first; c <= last; c++ {
		co, cn := b.chunkSpan(c)
		whole := off <= co && end >= co+cn
		if !was[c-first] && !whole {
			continue
		}
		lo, hi := max(off, co), min(end, co+cn)
		if _, err := b.data.WriteAt(p[lo-off:hi-off], lo); err != nil {
			continue // stays invalid: reads go to the source
		}
		if b.bits.Set(c) && !was[c-first] && b.onFill != nil {
			b.onFill(cn)
		}
	}
	b.kickCommit()
	return nil
}

// ZeroThrough zeroes (or, with trim, trims) the range on the source and
// drops the chunks it touches from the cache.
func (b *Base) ZeroThrough(off, length int64, trim bool) error {
	if err := blockdev.CheckRange(b.size, off, length); err != nil {
		return err
	}
	for length > 0 {
		end := min(off+length, (off/b.chunk+maxLockSpan)*b.chunk)
		if err := b.zeroPiece(off, end-off, trim); err != nil {
			return err
		}
		length -= end - off
		off = end
	}
	return nil
}

func (b *Base) zeroPiece(off, n int64, trim bool) error {
	first, last := off/b.chunk, (off+n-1)/b.chunk
	b.lockSpan(first, last)
	defer b.unlockSpan(first, last)
	if !b.degraded.Load() {
		if _, err := b.invalidate(first, last); err != nil {
			return err
		}
	}
	if trim {
		return b.source.Trim(off, n)
	}
	return b.source.WriteZeroes(off, n)
}

// FlushSource makes every write-through so far durable on the source.
func (b *Base) FlushSource() error { return b.source.Flush() }
