// Package cow is the copy-on-write layer: a per-VM sparse store file with a
// persistent bitmap (package pbitmap) over a read-only base. Written,
// trimmed and zeroed ranges live in the store; the rest reads through to
// the base. Trimmed ranges read back as zeroes, never as the base again.
//
// Granularity: the bitmap has one bit per cluster, 4 KiB by default. Guest
// writes are mostly 4 KiB-aligned, so they need no read-modify-write, and
// the store holds only what was written; the bitmap is sparse in memory
// (pbitmap), so a 4 KiB cluster costs memory only where the guest wrote. A
// write that covers part of an absent cluster reads that cluster from the
// base, merges, and writes it whole, under a lock of its region, before the
// bit is set.
//
// Durability: Flush fdatasyncs the store, then writes and fdatasyncs the
// bitmap (pbitmap.Sync), so every write acknowledged before it survives a
// crash; a bit is never on disk before its data.
package cow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache/pbitmap"
	"golang.org/x/sys/unix"
)

// DefaultClusterSize is the bitmap granularity when none is given.
const DefaultClusterSize = 4096

// ErrMismatch is wrapped when a store does not fit the base.
var ErrMismatch = errors.New("cow store does not match base")

// ErrInUse is returned when the store is open elsewhere.
var ErrInUse = errors.New("cow store is in use")

const (
	regionClusters = 64 // clusters per lock region
	stripes        = 256
)

// Options tune a store.
type Options struct {
	// ClusterSize in bytes, a power of two >= 512; 0: the store's own, or
	// DefaultClusterSize for a new store.
	ClusterSize int64
}

// Dev is a copy-on-write device. Close closes the store, not the base.
type Dev struct {
	base  blockdev.Device
	size  int64
	cl    int64
	path  string
	store *os.File
	bits  *pbitmap.Bitmap
	locks [stripes]sync.Mutex
	pool  sync.Pool
	zero  []byte

	written, zeroed, rmw atomic.Uint64
}

// Stats are the layer's counters.
type Stats struct {
	ClusterSize     int64
	ClustersPresent int64
	BytesWritten    uint64
	BytesZeroed     uint64
	ReadModifyWrite uint64 // partial writes to clusters not yet in the store
}

// validCluster is the rule for cluster sizes, asked for or read from a
// header: a damaged header must not size buffers (Open allocates one
// cluster of zeroes, partial writes one more).
func validCluster(cl int64) bool { return cl >= 512 && cl <= 1<<20 && cl&(cl-1) == 0 }

// Open opens the store at path (and its bitmap at path+".bitmap"), creating
// both if the store does not exist or is empty. Reopening resumes it.
func Open(path string, base blockdev.Device, o Options) (*Dev, error) {
	cl := o.ClusterSize
	if cl != 0 && !validCluster(cl) {
		return nil, fmt.Errorf("%w: cluster size %d must be a power of two between 512 and 1 MiB", blockdev.ErrInvalid, cl)
	}
	size := base.Size()
	bmPath := path + ".bitmap"
	// One writer per store: a second process flushing its own view of the
	// bitmap would lose the first one's acknowledged writes.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open cow store: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: cow store %s is open in another export or process", ErrInUse, path)
	}
	// A Remove that won the lock may have unlinked the store before we
	// locked it: writes would go to a file no name reaches.
	if !samePath(f, path) {
		f.Close()
		return nil, fmt.Errorf("%w: cow store %s was removed while it was being opened; try again", ErrInUse, path)
	}
	d, err := openLocked(path, bmPath, f, base, size, cl)
	if err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

func openLocked(path, bmPath string, f *os.File, base blockdev.Device, size, cl int64) (*Dev, error) {
	h, err := pbitmap.ReadHeader(bmPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if cl == 0 {
			cl = DefaultClusterSize
		}
		if err := create(path, bmPath, pbitmap.Header{Kind: "cow", Size: size, UnitSize: cl}); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, fmt.Errorf("cow store %s: %w", path, err)
	case h.Kind != "cow":
		return nil, fmt.Errorf("%w: %s is a %q bitmap, not a cow store's", ErrMismatch, bmPath, h.Kind)
	case !validCluster(h.UnitSize):
		return nil, fmt.Errorf("%w: %s: damaged header (%w): cluster size %d is not a power of two between 512 and 1 MiB",
			ErrMismatch, bmPath, pbitmap.ErrFormat, h.UnitSize)
	case h.Size != size:
		return nil, fmt.Errorf("%w: store %s was made for a base of %d bytes, this base has %d", ErrMismatch, path, h.Size, size)
	case cl != 0 && h.UnitSize != cl:
		return nil, fmt.Errorf("%w: store %s has cluster size %d, asked for %d", ErrMismatch, path, h.UnitSize, cl)
	default:
		cl = h.UnitSize
	}
	if st, err := f.Stat(); err != nil || st.Size() < size {
		if err == nil {
			err = fmt.Errorf("%w: store file %s is %d bytes, the base needs %d", ErrMismatch, path, st.Size(), size)
		}
		return nil, err
	}
	fd := int(f.Fd())
	bits, err := pbitmap.Open(bmPath, func() error { return unix.Fdatasync(fd) })
	if err != nil {
		return nil, fmt.Errorf("cow store %s: %w", path, err)
	}
	d := &Dev{base: base, size: size, cl: cl, path: path, store: f, bits: bits, zero: make([]byte, cl)}
	d.pool.New = func() any { b := make([]byte, cl); return &b }
	return d, nil
}

// create makes a new store: the sparse store file first, then the bitmap
// (atomically). A crash in between leaves a store without a bitmap, which
// is adopted only if it holds no data, so a file that is not ours is
// never overwritten.
func create(path, bmPath string, h pbitmap.Header) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("create cow store: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return err
	} else if st.Size() > 0 && hasData(f) {
		return fmt.Errorf("%w: %s exists and has data but no bitmap %s: not a cow store (remove it to start afresh)", ErrMismatch, path, bmPath)
	}
	if err := f.Truncate(h.Size); err != nil {
		return fmt.Errorf("size cow store %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync cow store %s: %w", path, err)
	}
	return pbitmap.Create(bmPath, h)
}

func hasData(f *os.File) bool {
	_, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA)
	return !errors.Is(err, unix.ENXIO)
}

func (d *Dev) Size() int64 { return d.size }

// ClusterSize is the bitmap granularity.
func (d *Dev) ClusterSize() int64 { return d.cl }

func (d *Dev) clusterEnd(c int64) int64 { return min((c+1)*d.cl, d.size) }

func (d *Dev) ReadAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(d.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	end := off + int64(len(p))
	for pos := off; pos < end; {
		c := pos / d.cl
		inStore := d.bits.Get(c)
		runEnd := d.clusterEnd(c)
		for runEnd < end && d.bits.Get(runEnd/d.cl) == inStore {
			runEnd = d.clusterEnd(runEnd / d.cl)
		}
		runEnd = min(runEnd, end)
		seg := p[pos-off : runEnd-off]
		var err error
		if inStore {
			_, err = d.store.ReadAt(seg, pos)
			if err == io.EOF {
				err = fmt.Errorf("%w: cow store %s ends before %d", blockdev.ErrShortIO, d.path, runEnd)
			}
		} else {
			_, err = d.base.ReadAt(seg, pos)
		}
		if err != nil {
			return int(pos - off), err
		}
		pos = runEnd
	}
	return len(p), nil
}

// lockRange locks the stripes of the regions [off, off+n) touches, in
// ascending stripe order (so two writers never deadlock), each once.
func (d *Dev) lockRange(off, n int64) (set [stripes / 64]uint64) {
	r0, r1 := off/d.cl/regionClusters, (off+n-1)/d.cl/regionClusters
	for r := r0; r <= r1 && r-r0 < stripes; r++ {
		s := r % stripes
		set[s/64] |= 1 << (s % 64)
	}
	for s := 0; s < stripes; s++ {
		if set[s/64]&(1<<(s%64)) != 0 {
			d.locks[s].Lock()
		}
	}
	return set
}

func (d *Dev) unlock(set [stripes / 64]uint64) {
	for s := 0; s < stripes; s++ {
		if set[s/64]&(1<<(s%64)) != 0 {
			d.locks[s].Unlock()
		}
	}
}

func (d *Dev) WriteAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(d.size, off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := d.bits.Err(); err != nil {
		return 0, fmt.Errorf("cow store %s failed earlier: %w", d.path, err)
	}
	set := d.lockRange(off, int64(len(p)))
	defer d.unlock(set)
	if err := d.writeLocked(p, off); err != nil {
		return 0, err
	}
	d.written.Add(uint64(len(p)))
	return len(p), nil
}

// writeLocked writes p at off with the region locks held: partial edge
// clusters not in the store are merged with the base first, the rest is
// one pwrite; bits are set after the data is written.
func (d *Dev) writeLocked(p []byte, off int64) error {
	end := off + int64(len(p))
	lo, hi := off, end
	if c := off / d.cl; (off > c*d.cl || end < d.clusterEnd(c)) && !d.bits.Get(c) {
		if err := d.merge(c, p[:min(end, d.clusterEnd(c))-off], off); err != nil {
			return err
		}
		lo = min(end, d.clusterEnd(c))
	}
	if c := (end - 1) / d.cl; lo < hi && end < d.clusterEnd(c) && !d.bits.Get(c) {
		s := max(lo, c*d.cl)
		if err := d.merge(c, p[s-off:], s); err != nil {
			return err
		}
		hi = s
	}
	if lo >= hi {
		return nil
	}
	if _, err := d.store.WriteAt(p[lo-off:hi-off], lo); err != nil {
		return d.storeErr(err)
	}
	for c := lo / d.cl; c <= (hi-1)/d.cl; c++ {
		d.bits.Set(c)
	}
	return nil
}

// merge writes cluster c whole: the base's bytes with p laid over at off.
func (d *Dev) merge(c int64, p []byte, off int64) error {
	co, ce := c*d.cl, d.clusterEnd(c)
	bp := d.pool.Get().(*[]byte)
	defer d.pool.Put(bp)
	buf := (*bp)[:ce-co]
	if _, err := d.base.ReadAt(buf, co); err != nil {
		return fmt.Errorf("read base for a partial write at %d: %w", off, err)
	}
	copy(buf[off-co:], p)
	if _, err := d.store.WriteAt(buf, co); err != nil {
		return d.storeErr(err)
	}
	d.bits.Set(c)
	d.rmw.Add(1)
	return nil
}

func (d *Dev) storeErr(err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) && (errno == unix.ENOSPC || errno == unix.EDQUOT) {
		return fmt.Errorf("%w: cow store %s: %v", blockdev.ErrNoSpace, d.path, err)
	}
	return fmt.Errorf("write cow store %s: %w", d.path, err)
}

// WriteZeroes puts zeroes in the store: whole clusters by punching a hole,
// partial ones by writing zeroes.
func (d *Dev) WriteZeroes(off, length int64) error {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if err := d.bits.Err(); err != nil {
		return fmt.Errorf("cow store %s failed earlier: %w", d.path, err)
	}
	set := d.lockRange(off, length)
	defer d.unlock(set)
	end := off + length
	lo, hi := (off+d.cl-1)/d.cl*d.cl, end/d.cl*d.cl
	if end == d.size {
		hi = end // a short last cluster is whole when the range reaches the end
	}
	if lo >= hi { // within one cluster
		return d.writeZeroBytes(off, end)
	}
	if err := d.writeZeroBytes(off, lo); err != nil {
		return err
	}
	if err := d.writeZeroBytes(hi, end); err != nil {
		return err
	}
	err := unix.Fallocate(int(d.store.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, lo, hi-lo)
	if err != nil {
		for pos := lo; pos < hi; pos += d.cl { // no hole punching here: write them
			if _, err := d.store.WriteAt(d.zero[:min(d.cl, hi-pos)], pos); err != nil {
				return d.storeErr(err)
			}
		}
	}
	for c := lo / d.cl; c <= (hi-1)/d.cl; c++ {
		d.bits.Set(c)
	}
	d.zeroed.Add(uint64(length))
	return nil
}

func (d *Dev) writeZeroBytes(from, to int64) error {
	for from < to {
		n := min(to-from, d.cl-from%d.cl)
		if err := d.writeLocked(d.zero[:n], from); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// Trim zeroes: a trimmed range must not show the base again.
func (d *Dev) Trim(off, length int64) error { return d.WriteZeroes(off, length) }

// Flush makes every acknowledged write durable: store, then bitmap.
func (d *Dev) Flush() error {
	if err := d.bits.Sync(); err != nil {
		return fmt.Errorf("flush cow store %s: %w", d.path, err)
	}
	return nil
}

func (d *Dev) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.size, off, length); err != nil {
		return nil, err
	}
	return []blockdev.Extent{{Length: length}}, nil
}

// Prefetch asks the base; written clusters are local already.
func (d *Dev) Prefetch(off, length int64) error { return d.base.Prefetch(off, length) }

func (d *Dev) Caps() blockdev.Caps {
	return blockdev.Caps{Flush: true, Trim: true, WriteZeroes: true, FastZero: true,
		BlockStatus: true, Prefetch: true, MultiConn: true,
		MinBlock: 1, PreferredBlock: 4096, MaxBlock: 32 << 20}
}

// Stats returns the counters.
func (d *Dev) Stats() Stats {
	return Stats{ClusterSize: d.cl, ClustersPresent: d.bits.Count(), BytesWritten: d.written.Load(),
		BytesZeroed: d.zeroed.Load(), ReadModifyWrite: d.rmw.Load()}
}

// Close flushes and closes the store; the base stays open.
func (d *Dev) Close() error {
	err := d.Flush()
	return errors.Join(err, d.bits.Close(), d.store.Close())
}

// Remove deletes the store at path and its bitmap, refusing (ErrInUse)
// while it is open anywhere. The bitmap goes first: a crash in between
// leaves a store file that is refused as "not a cow store", never one
// that is resumed without its bitmap.
func Remove(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if errors.Is(err, os.ErrNotExist) {
		return errors.Join(removeIfExists(path+".bitmap"), removeIfExists(path+".bitmap.tmp"))
	}
	if err != nil {
		return fmt.Errorf("remove cow store: %w", err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("%w: cow store %s is open in another export or process", ErrInUse, path)
	}
	// A bitmap being created when a process died is left as .tmp.
	if err := errors.Join(removeIfExists(path+".bitmap"), removeIfExists(path+".bitmap.tmp")); err != nil {
		return err
	}
	return removeIfExists(path)
}

// samePath reports whether path still names the open file f.
func samePath(f *os.File, path string) bool {
	a, err := f.Stat()
	if err != nil {
		return false
	}
	b, err := os.Lstat(path)
	return err == nil && os.SameFile(a, b)
}

func removeIfExists(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove cow store: %w", err)
	}
	return nil
}
