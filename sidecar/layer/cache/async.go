package cache

import (
	"fmt"
	"syscall"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
)

// The asynchronous read path (blockdev.AsyncReader), so an export over a
// remote origin keeps its reads off parked goroutines through the cache:
//
//   - a hit is read from the cache file at once when that cannot wait for
//     a disk (RWF_NOWAIT, or a cache in memory) and done runs before
//     ReadAtAsync returns; a hit the kernel would have to wait for is read
//     on a goroutine of its own;
//   - a miss within one chunk takes the chunk's lock without waiting,
//     fetches the chunk through the source's asynchronous path, answers
//     from the fetched bytes, then stores the chunk and releases the lock
//     on a goroutine (off the source's goroutine). The lock is the one the
//     synchronous fills and write-through take, so a fill still never
//     stores a chunk written through meanwhile;
//   - the rest (a chunk being filled by another request, reads over
//     several chunks with some missing) runs the synchronous path on a
//     goroutine.
//
// The path exists when the source has one: Ref.Unwrap returns it for
// blockdev.AsyncOf, nil otherwise (a file origin keeps the NBD server's
// workers).

// asyncBase is a Ref seen through its asynchronous read path; its reads
// are counted in the Ref's tally. Every other call goes to the Ref.
type asyncBase struct {
	blockdev.Device
	b     *Base
	src   blockdev.AsyncReader
	tally *Tally
	data  syscall.RawConn // the cache file's
	mem   bool            // the cache file is in memory (memFS)
}

// Unwrap returns the reference's asynchronous read path (its reads are
// counted for it, as ReadAt's are), or nil when the source has none.
func (r *Ref) Unwrap() blockdev.Device {
	src := blockdev.AsyncOf(r.source)
	if src == nil {
		return nil
	}
	rc, err := r.data.SyscallConn()
	if err != nil {
		return nil
	}
	return &asyncBase{Device: r, b: r.Base, src: src, tally: &r.tally, data: rc, mem: fsutil.InMemory(rc)}
}

func (a *asyncBase) Unplug() { a.src.Unplug() }

func (a *asyncBase) ReadAtAsync(p []byte, off int64, done func(error)) {
	b, t := a.b, a.tally
	if err := blockdev.CheckRange(b.size, off, int64(len(p))); err != nil {
		done(err)
		return
	}
	if len(p) == 0 {
		done(nil)
		return
	}
	if b.degraded.Load() {
		t.add(0, uint64(len(p)))
		a.src.ReadAtAsync(p, off, done)
		return
	}
	first, last := off/b.chunk, (off+int64(len(p))-1)/b.chunk
	missing := int64(-1)
	for c := first; c <= last; c++ {
		if !b.bits.Get(c) {
			if missing >= 0 {
				missing = -2 // more than one
				break
			}
			missing = c
		}
	}
	switch {
	case missing == -1:
		b.hits.Add(1)
		a.readHit(p, off, done)
		return
	case missing >= 0 && first == last:
		if a.fill(missing, p, off, done) {
			return
		}
	}
	go func() {
		_, err := b.readAt(p, off, t)
		done(err)
	}()
}

// readHit reads present chunks from the cache file: now if the page cache
// has them, else on a goroutine.
func (a *asyncBase) readHit(p []byte, off int64, done func(error)) {
	b := a.b
	if fsutil.ReadNow(a.data, a.mem, p, off) {
		b.fromCache.Add(uint64(len(p)))
		a.tally.add(uint64(len(p)), 0)
		done(nil)
		return
	}
	go func() {
		n, err := b.data.ReadAt(p, off)
		if err != nil {
			done(fmt.Errorf("read cache %s: %w", b.dir, err))
			return
		}
		b.fromCache.Add(uint64(n))
		a.tally.add(uint64(n), 0)
		done(nil)
	}()
}

// fill serves a read within chunk c, which was missing, by fetching the
// chunk through the source's asynchronous path. It reports false, having
// done nothing, when another request holds the chunk's lock.
func (a *asyncBase) fill(c int64, p []byte, off int64, done func(error)) bool {
	b := a.b
	l := b.locks.tryLock(c)
	if l == nil {
		return false
	}
	if b.bits.Get(c) { // filled since we looked
		b.locks.unlock(c, l)
		b.hits.Add(1)
		a.readHit(p, off, done)
		return true
	}
	b.misses.Add(1)
	coff, n := b.chunkSpan(c)
	bp := b.pool.Get().(*[]byte)
	buf := (*bp)[:n]
	a.src.ReadAtAsync(buf, coff, func(err error) {
		if err != nil {
			b.pool.Put(bp)
			b.locks.unlock(c, l)
			done(fmt.Errorf("fill chunk %d (offset %d) from source: %w", c, coff, err))
			return
		}
		copy(p, buf[off-coff:])
		b.fromSource.Add(uint64(n))
		b.fromCache.Add(uint64(len(p))) // as the synchronous path counts a miss
		a.tally.add(0, uint64(n))
		done(nil)
		// The source's goroutine serves every read in flight: the copy
		// into the cache file is not its to wait for.
		b.stores.Add(1) // close waits: the chunk is kept, not written to a closed file
		go func() {
			defer b.stores.Done()
			b.store(c, buf, coff)
			b.pool.Put(bp)
			b.locks.unlock(c, l)
		}()
	})
	return true
}

// tryLock locks chunk c's lock if no one holds it, without waiting; nil
// if someone does. unlock releases it, from any goroutine.
func (t *chunkLocks) tryLock(c int64) *chunkLock {
	t.mu.Lock()
	defer t.mu.Unlock()
	l := t.m[c]
	if l == nil {
		l = &chunkLock{refs: 1}
		l.mu.Lock()
		t.m[c] = l
		return l
	}
	if !l.mu.TryLock() {
		return nil
	}
	l.refs++
	return l
}
