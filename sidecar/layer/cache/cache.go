// Package cache is the copy-on-read base cache: one per base on a node,
// shared by every export of that base (see Manager). Chunks are filled whole
// from a source device (today the origin, later the peers layer) into a
// sparse data file; a persistent bitmap (package pbitmap) says which chunks
// are present and is never ahead of the data on disk.
//
// Toward the guest a Base is read-only. The write-through layer uses
// WriteThrough/ZeroThrough, which write the source first and keep the cache
// correct under the same per-chunk lock the fills take.
package cache

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache/pbitmap"
	"golang.org/x/sys/unix"
)

// DefaultChunkSize is the fill unit when none is given.
const DefaultChunkSize = 256 << 10

// ErrMismatch is wrapped when an existing cache does not fit the base.
var ErrMismatch = errors.New("cache does not match base")

// Stats are a base's counters, for metrics.
type Stats struct {
	Size, ChunkSize int64
	Chunks          int64
	ChunksPresent   int64
	BytesPresent    int64
	Hits            uint64 // read requests served wholly from the cache file
	Misses          uint64 // read requests that needed at least one fill
	Fills           uint64 // chunks fetched from the source
	BytesFromCache  uint64 // guest-read bytes served from the cache file
	BytesFromSource uint64 // bytes fetched from the source (fills, prefetch, warm)
	WriteThrough    uint64 // bytes written through to the source
	Invalidations   uint64 // chunks dropped because the source changed under them
	Degraded        bool   // a sync failed: the cache is bypassed
}

// Base is one base's cache. It implements blockdev.Device (read-only).
type Base struct {
	dir       string
	size      int64
	chunk     int64
	source    blockdev.Device
	data      *os.File
	dataFd    int
	lockDir   *os.File // flock held while open: one process per cache
	bits      *pbitmap.Bitmap
	locks     chunkLocks
	pool      sync.Pool // *[]byte of chunk size
	kick      chan struct{}
	stop      chan struct{}
	committer sync.WaitGroup
	degraded  atomic.Bool
	onFill    func(bytes int64) // manager's budget accounting
	rebuilt   string            // why an earlier cache here was emptied on open, if it was
	stores    sync.WaitGroup    // chunk stores still running after their read was answered (async.go)

	hits, misses, fills, fromCache, fromSource, wt, inval atomic.Uint64
}

// openBase opens or creates the cache in dir for source, bound to bind.
// chunk 0 adopts the existing chunk size (or the default for a new cache).
// newChunk is the chunk size of a new cache when chunk is 0 (0: the default).
func openBase(dir string, source blockdev.Device, chunk int64, bind Binding, newChunk int64) (*Base, error) {
	if chunk < 0 || (chunk != 0 && !validChunk(chunk)) {
		return nil, fmt.Errorf("%w: chunk size %d must be a power of two between 4 KiB and 64 MiB", blockdev.ErrInvalid, chunk)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dir)); err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	lk, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	if err := unix.Flock(int(lk.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lk.Close()
		return nil, fmt.Errorf("cache %s is in use by another process: %w", dir, err)
	}
	rebuilt, err := checkIdentity(dir, bind)
	if err != nil {
		lk.Close()
		return nil, err
	}
	b, err := openLocked(dir, source, chunk, newChunk)
	if err != nil {
		lk.Close()
		return nil, err
	}
	b.lockDir, b.rebuilt = lk, rebuilt
	return b, nil
}

// checkIdentity empties the cache in dir unless it provably holds bind's
// content, and records bind. It says why it emptied a cache that had
// content ("" when it kept it or there was none).
func checkIdentity(dir string, bind Binding) (string, error) {
	have, err := readIdentity(dir)
	_, bmErr := os.Stat(filepath.Join(dir, "bitmap"))
	filled := bmErr == nil
	why := ""
	switch {
	case !bind.IsTemplate():
		// A volume may have changed since any earlier export of ours.
		why = "a volume's cache is not kept across attachments"
	case errors.Is(err, os.ErrNotExist):
		why = "it records no identity"
	case err != nil:
		why = err.Error()
	case !sameContent(have, bind):
		why = "it held " + have.String()
	default:
		return "", nil
	}
	// The trace goes first: a reset cut short after identity.json and the
	// bitmap would leave what looks like a new directory, whose trace is
	// kept (below).
	files := []string{TraceFile, identityFile, "bitmap", "data"}
	if errors.Is(err, os.ErrNotExist) && !filled && bind.IsTemplate() {
		// A new directory: a trace imported for this template before its
		// first open was made for this base id, so for this content.
		files = files[1:]
	}
	for _, f := range files {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("reset cache %s: %w", dir, err)
		}
	}
	if err := writeIdentity(dir, bind); err != nil {
		return "", err
	}
	if !filled {
		return "", nil
	}
	return why, nil
}

// validChunk is the rule for chunk sizes, asked for or read from a header:
// a damaged header must not size buffers (one chunk per fill).
func validChunk(c int64) bool { return c >= 4096 && c <= 64<<20 && c&(c-1) == 0 }

func openLocked(dir string, source blockdev.Device, chunk, newChunk int64) (*Base, error) {
	size := source.Size()
	dataPath, bmPath := filepath.Join(dir, "data"), filepath.Join(dir, "bitmap")
	h, err := pbitmap.ReadHeader(bmPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// New cache, or one whose creation crashed: start from nothing.
		if chunk == 0 {
			chunk = newChunk
		}
		if chunk == 0 {
			chunk = DefaultChunkSize
		}
		h = pbitmap.Header{Kind: "cache", Size: size, UnitSize: chunk}
		if err := os.Remove(dataPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("reset cache data: %w", err)
		}
		if err := pbitmap.Create(bmPath, h); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, fmt.Errorf("cache %s: %w (remove the directory to rebuild it)", dir, err)
	case h.Kind != "cache":
		return nil, fmt.Errorf("%w: %s is a %q bitmap, not a cache", ErrMismatch, bmPath, h.Kind)
	case !validChunk(h.UnitSize):
		return nil, fmt.Errorf("%w: %s: damaged header (%w): chunk size %d is not a power of two between 4 KiB and 64 MiB (remove the directory to rebuild it)",
			ErrMismatch, bmPath, pbitmap.ErrFormat, h.UnitSize)
	case h.Size != size:
		return nil, fmt.Errorf("%w: cache %s holds a base of %d bytes, but its origin now has %d: the origin no longer holds that content (publish a new generation)", ErrMismatch, dir, h.Size, size)
	case chunk != 0 && h.UnitSize != chunk:
		return nil, fmt.Errorf("%w: cache %s has chunk size %d, asked for %d (use the same chunk size or remove it)", ErrMismatch, dir, h.UnitSize, chunk)
	}
	f, err := os.OpenFile(dataPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cache data: %w", err)
	}
	if err := fsutil.SyncDir(dir); err != nil { // the new bitmap and data files
		f.Close()
		return nil, fmt.Errorf("cache directory %s: %w", dir, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cache data %s: %w", dataPath, err)
	}
	fd := int(f.Fd())
	bits, err := pbitmap.Open(bmPath, func() error { return unix.Fdatasync(fd) })
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cache %s: %w (remove the directory to rebuild it)", dir, err)
	}
	// The data file is sized before any fill and that size is synced with
	// the first fill's data, so a present chunk past its end means it was
	// cut short or replaced: the chunk would read as zeroes. (A short file
	// with no chunks is a creation that crashed: fine, it is sized below.)
	if have := st.Size(); have < size && bits.Count() > 0 {
		for c := have / h.UnitSize; c < bits.Len(); c++ {
			if bits.Get(c) {
				bits.Close()
				f.Close()
				return nil, fmt.Errorf("%w: cache data %s is %d bytes, but chunk %d (offset %d) is marked present (remove the directory to rebuild it)",
					ErrMismatch, dataPath, have, c, c*h.UnitSize)
			}
		}
	}
	if err := f.Truncate(size); err != nil { // sparse; never shrinks a valid one (sizes match)
		bits.Close()
		f.Close()
		return nil, fmt.Errorf("size cache data %s: %w", dataPath, err)
	}
	b := &Base{dir: dir, size: size, chunk: h.UnitSize, source: source, data: f, dataFd: fd,
		bits: bits, kick: make(chan struct{}, 1), stop: make(chan struct{})}
	b.locks.m = map[int64]*chunkLock{}
	b.pool.New = func() any { p := make([]byte, b.chunk); return &p }
	b.committer.Add(1)
	go b.commitLoop()
	return b, nil
}

// commitLoop persists fills in the background, one group per round, so a
// fill never waits for an fdatasync and many fills share one.
func (b *Base) commitLoop() {
	defer b.committer.Done()
	for {
		select {
		case <-b.kick:
		case <-b.stop:
			return
		}
		if err := b.bits.Sync(); err != nil {
			b.degrade()
		}
	}
}

func (b *Base) kickCommit() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// Size is the base size recorded when the cache was opened; it does not
// ask the source, so a warm cache answers with the origin gone.
func (b *Base) Size() int64      { return b.size }
func (b *Base) ChunkSize() int64 { return b.chunk }

// TraceFile is the name, in a base's directory, of its boot trace
// (package prefetch). It is removed with the content it was recorded for
// whenever the cache is emptied on open (see checkIdentity).
const TraceFile = "trace"

// Dir is the base's cache directory.
func (b *Base) Dir() string { return b.dir }

// Source is the device misses are filled from.
func (b *Base) Source() blockdev.Device { return b.source }

// Present reports whether chunk i is in the cache.
func (b *Base) Present(i int64) bool { return b.bits.Get(i) }

func (b *Base) ReadAt(p []byte, off int64) (int, error) { return b.readAt(p, off, nil) }

// Tally counts what one user's reads cost: the daemon reports it per
// export, while Stats is the whole base's.
type Tally struct {
	FromCache  atomic.Uint64 // bytes of reads that hit
	FromSource atomic.Uint64 // bytes fetched from the source for its reads
}

func (t *Tally) add(cache, source uint64) {
	if t != nil {
		t.FromCache.Add(cache)
		t.FromSource.Add(source)
	}
}

func (b *Base) readAt(p []byte, off int64, t *Tally) (int, error) {
	if err := blockdev.CheckRange(b.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if b.degraded.Load() {
		t.add(0, uint64(len(p)))
		return b.source.ReadAt(p, off)
	}
	first, last := off/b.chunk, (off+int64(len(p))-1)/b.chunk
	missing := 0
	for c := first; c <= last; c++ {
		if !b.bits.Get(c) {
			missing++
		}
	}
	if missing == 0 {
		b.hits.Add(1)
	} else {
		b.misses.Add(1)
		if err := b.fillRange(first, last, missing, t); err != nil {
			return 0, err
		}
		// A chunk may still be absent: the cache disk refused the write,
		// or write-through invalidated it since. The source has it.
		for c := first; c <= last; c++ {
			if !b.bits.Get(c) || b.degraded.Load() {
				t.add(0, uint64(len(p)))
				return b.source.ReadAt(p, off)
			}
		}
	}
	n, err := b.data.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("read cache %s: %w", b.dir, err)
	}
	b.fromCache.Add(uint64(n))
	if missing == 0 {
		t.add(uint64(n), 0)
	}
	return n, nil
}

// fillRange fills the missing chunks of [first, last], several at once
// when there are several (a network source then overlaps round trips).
func (b *Base) fillRange(first, last int64, missing int, t *Tally) error {
	if missing == 1 {
		for c := first; c <= last; c++ {
			if !b.bits.Get(c) {
				return b.fill(c, t)
			}
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	sem := make(chan struct{}, 4)
	for c := first; c <= last; c++ {
		if b.bits.Get(c) {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(c int64) {
			defer func() { <-sem; wg.Done() }()
			if err := b.fill(c, t); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}(c)
	}
	wg.Wait()
	return firstErr
}

func (b *Base) chunkSpan(c int64) (off, n int64) {
	off = c * b.chunk
	return off, min(b.chunk, b.size-off)
}

// fill fetches chunk c unless present. Concurrent callers for the same
// chunk queue on its lock and find it present: one fetch per chunk.
func (b *Base) fill(c int64, t *Tally) error {
	if b.bits.Get(c) {
		return nil
	}
	l := b.locks.lock(c)
	defer b.locks.unlock(c, l)
	if b.bits.Get(c) {
		return nil
	}
	off, n := b.chunkSpan(c)
	bp := b.pool.Get().(*[]byte)
	defer b.pool.Put(bp)
	buf := (*bp)[:n]
	if _, err := b.source.ReadAt(buf, off); err != nil {
		return fmt.Errorf("fill chunk %d (offset %d) from source: %w", c, off, err)
	}
	b.fromSource.Add(uint64(n))
	t.add(0, uint64(n))
	return b.store(c, buf, off)
}

// store writes a whole chunk's bytes and marks it present; the bit goes to
// disk later, after an fdatasync of the data (pbitmap.Sync).
func (b *Base) store(c int64, buf []byte, off int64) error {
	if _, err := b.data.WriteAt(buf, off); err != nil {
		// The source read worked, so the guest is not failed; we just
		// don't cache (e.g. the cache disk is full).
		return nil
	}
	if b.bits.Set(c) {
		b.fills.Add(1)
		if b.onFill != nil {
			b.onFill(int64(len(buf)))
		}
	}
	b.kickCommit()
	return nil
}

// Prefetch fills the chunks of the range (NBD_CMD_CACHE).
func (b *Base) Prefetch(off, length int64) error {
	if err := blockdev.CheckRange(b.size, off, length); err != nil {
		return err
	}
	if length == 0 || b.degraded.Load() {
		return nil
	}
	first, last := off/b.chunk, (off+length-1)/b.chunk
	missing := 0
	for c := first; c <= last; c++ {
		if !b.bits.Get(c) {
			missing++
		}
	}
	if missing == 0 {
		return nil
	}
	return b.fillRange(first, last, missing, nil)
}

// Warm fills every chunk, then makes the cache durable. progress (may be
// nil) is called with bytes done and total, from one goroutine at a time.
func (b *Base) Warm(ctx context.Context, progress func(done, total int64)) error {
	n := b.bits.Len()
	var done atomic.Int64
	var pmu sync.Mutex
	report := func() {
		if progress != nil {
			pmu.Lock()
			progress(min(done.Load(), b.size), b.size)
			pmu.Unlock()
		}
	}
	next := atomic.Int64{}
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c := next.Add(1) - 1
				if c >= n || ctx.Err() != nil {
					return
				}
				if err := b.fill(c, nil); err != nil {
					errc <- err
					return
				}
				_, l := b.chunkSpan(c)
				done.Add(l)
				report()
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	report()
	return b.Sync()
}

// Sync makes every fill so far durable.
func (b *Base) Sync() error {
	if err := b.bits.Sync(); err != nil {
		b.degrade()
		return fmt.Errorf("cache %s: %w", b.dir, err)
	}
	return nil
}

// degrade stops using the cache after a failed sync (the disk may have
// dropped data) and removes the bitmap so a restart rebuilds rather than
// trusts it.
func (b *Base) degrade() {
	if !b.degraded.Swap(true) {
		os.Remove(filepath.Join(b.dir, "bitmap"))
	}
}

func (b *Base) WriteAt(p []byte, off int64) (int, error) { return 0, blockdev.ErrReadOnly }
func (b *Base) Flush() error                             { return nil }
func (b *Base) Trim(off, length int64) error             { return blockdev.ErrReadOnly }
func (b *Base) WriteZeroes(off, length int64) error      { return blockdev.ErrReadOnly }

// BlockStatus says everything is data: the cache does not know the
// source's holes without asking it.
func (b *Base) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(b.size, off, length); err != nil {
		return nil, err
	}
	return []blockdev.Extent{{Length: length}}, nil
}

func (b *Base) Caps() blockdev.Caps {
	return blockdev.Caps{ReadOnly: true, BlockStatus: true, Prefetch: true, MultiConn: true,
		MinBlock: 1, PreferredBlock: 4096, MaxBlock: 32 << 20}
}

// Stats returns the counters.
func (b *Base) Stats() Stats {
	present := b.bits.Count()
	bytes := present * b.chunk
	if n := b.bits.Len(); present > 0 && b.bits.Get(n-1) {
		bytes -= n*b.chunk - b.size // the last chunk is short
	}
	return Stats{Size: b.size, ChunkSize: b.chunk, Chunks: b.bits.Len(), ChunksPresent: present,
		BytesPresent: bytes, Hits: b.hits.Load(), Misses: b.misses.Load(), Fills: b.fills.Load(),
		BytesFromCache: b.fromCache.Load(), BytesFromSource: b.fromSource.Load(),
		WriteThrough: b.wt.Load(), Invalidations: b.inval.Load(), Degraded: b.degraded.Load()}
}

// close syncs and closes the files and the source (the base owns it).
func (b *Base) close(drop bool) error {
	b.stores.Wait()
	err := b.bits.Sync()
	close(b.stop)
	b.committer.Wait()
	b.bits.Touch()
	errs := []error{err, b.bits.Close(), b.data.Close(), b.source.Close()}
	if drop {
		// Still under the directory's lock: no other process sees it half gone.
		if rerr := os.RemoveAll(b.dir); rerr != nil {
			errs = append(errs, fmt.Errorf("drop cache %s: %w", b.dir, rerr))
		}
	}
	if b.lockDir != nil {
		errs = append(errs, b.lockDir.Close())
	}
	return errors.Join(errs...)
}

// chunkLocks is a lock per chunk, made on demand: fills and write-through
// of one chunk exclude each other, other chunks go on.
type chunkLocks struct {
	mu sync.Mutex
	m  map[int64]*chunkLock
}

type chunkLock struct {
	mu   sync.Mutex
	refs int
}

func (t *chunkLocks) lock(c int64) *chunkLock {
	t.mu.Lock()
	l := t.m[c]
	if l == nil {
		l = &chunkLock{}
		t.m[c] = l
	}
	l.refs++
	t.mu.Unlock()
	l.mu.Lock()
	return l
}

func (t *chunkLocks) unlock(c int64, l *chunkLock) {
	l.mu.Unlock()
	t.mu.Lock()
	if l.refs--; l.refs == 0 {
		delete(t.m, c)
	}
	t.mu.Unlock()
}
