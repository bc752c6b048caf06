// Package pbitmap is a persistent, crash-consistent bitmap of "this unit of
// a data file holds valid bytes", shared by the base cache (one bit per
// chunk) and the copy-on-write store (one bit per cluster).
//
// In memory the bitmap is two-level: leaves of 4096 bits are allocated on the
// first Set, so an empty or sparse bitmap over a large device costs almost
// nothing. Get/Set/Clear are lock-free (atomics), so a cache hit is one
// atomic load.
//
// On disk it is one file: a 4 KiB header (magic, kind, device size, unit
// size), then the bits, flat. Sync persists it with the one ordering that
// keeps it never ahead of the data: snapshot the dirty leaves, fdatasync the
// data file, write the snapshot, fdatasync the bitmap file. Every bit in the
// snapshot was set after its data write returned, so the data fdatasync
// covers it. Concurrent Syncs are grouped: one runs, the others wait for a
// round that started after they asked.
package pbitmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	HeaderSize = 4096
	leafBits   = 4096
	leafWords  = leafBits / 64
	leafBytes  = leafBits / 8
	magic      = "VMTBMAP1"
)

// ErrFormat is wrapped by every error about a bitmap file's contents.
var ErrFormat = errors.New("bad bitmap file")

// Header is what a bitmap file records about the data it describes.
type Header struct {
	Kind     string // "cache" or "cow"; at most 16 bytes
	Size     int64  // device size in bytes
	UnitSize int64  // bytes per bit (chunk or cluster size)
}

// Header layout offsets (little endian): Size, then UnitSize.
const (
	SizeOffset     = 24
	UnitSizeOffset = 32
)

// Units is the number of bits: ceil(Size/UnitSize).
func (h Header) Units() int64 { return (h.Size + h.UnitSize - 1) / h.UnitSize }

// valid rejects what Units cannot count: Size+UnitSize-1 must not overflow
// (a negative count would slip past the file length check).
func (h Header) valid() bool {
	return h.Size >= 0 && h.UnitSize > 0 && h.UnitSize <= math.MaxInt64-h.Size
}

type leaf [leafWords]atomic.Uint64

// Bitmap is an open bitmap file.
type Bitmap struct {
	hdr      Header
	n        int64
	leaves   []atomic.Pointer[leaf]
	dirty    []atomic.Bool
	count    atomic.Int64 // bits set
	f        *os.File
	syncData func() error

	cmu       sync.Mutex
	cond      sync.Cond
	started   uint64 // sync rounds started
	completed uint64 // sync rounds finished
	running   bool
	err       error // sticky: after a failed fdatasync nothing on disk is trusted
	buf       []byte
}

func encodeHeader(h Header) []byte {
	b := make([]byte, HeaderSize)
	copy(b, magic)
	copy(b[8:24], h.Kind)
	binary.LittleEndian.PutUint64(b[SizeOffset:], uint64(h.Size))
	binary.LittleEndian.PutUint64(b[UnitSizeOffset:], uint64(h.UnitSize))
	return b
}

// Create writes a fresh, all-zero bitmap file at path atomically (temp
// file, fsync, rename, fsync of the directory), replacing any old one.
func Create(path string, h Header) error {
	if !h.valid() || len(h.Kind) > 16 {
		return fmt.Errorf("%w: invalid header %+v", ErrFormat, h)
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("create bitmap: %w", err)
	}
	_, err = f.WriteAt(encodeHeader(h), 0)
	if err == nil {
		err = f.Truncate(HeaderSize + (h.Units()+7)/8)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = fsutil.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create bitmap %s: %w", path, err)
	}
	return nil
}

// ReadHeader returns the header of the bitmap file at path.
func ReadHeader(path string) (Header, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return Header{}, err
	}
	defer f.Close()
	return readHeader(f, path)
}

func readHeader(f *os.File, path string) (Header, error) {
	b := make([]byte, 40)
	if _, err := f.ReadAt(b, 0); err != nil {
		return Header{}, fmt.Errorf("%w: %s: header: %v", ErrFormat, path, err)
	}
	if string(b[:8]) != magic {
		return Header{}, fmt.Errorf("%w: %s: not a vmthunder bitmap (bad magic)", ErrFormat, path)
	}
	h := Header{
		Kind:     string(bytes.TrimRight(b[8:24], "\x00")),
		Size:     int64(binary.LittleEndian.Uint64(b[SizeOffset:])),
		UnitSize: int64(binary.LittleEndian.Uint64(b[UnitSizeOffset:])),
	}
	if !h.valid() {
		return Header{}, fmt.Errorf("%w: %s: size %d unit %d", ErrFormat, path, h.Size, h.UnitSize)
	}
	return h, nil
}

// Open loads the bitmap file at path. syncData makes the data file durable;
// Sync calls it before writing bits.
func Open(path string, syncData func() error) (*Bitmap, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("open bitmap: %w", err)
	}
	b, err := load(f, path, syncData)
	if err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

func load(f *os.File, path string, syncData func() error) (*Bitmap, error) {
	h, err := readHeader(f, path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	n := h.Units()
	if want := HeaderSize + (n+7)/8; st.Size() != want {
		return nil, fmt.Errorf("%w: %s is %d bytes, want %d for %d units", ErrFormat, path, st.Size(), want, n)
	}
	nl := (n + leafBits - 1) / leafBits
	b := &Bitmap{hdr: h, n: n, leaves: make([]atomic.Pointer[leaf], nl),
		dirty: make([]atomic.Bool, nl), f: f, syncData: syncData}
	b.cond.L = &b.cmu
	raw := make([]byte, leafBytes)
	for i := int64(0); i < nl; i++ {
		clear(raw)
		m := min(int64(leafBytes), (n+7)/8-i*leafBytes)
		if _, err := f.ReadAt(raw[:m], HeaderSize+i*leafBytes); err != nil {
			return nil, fmt.Errorf("read bitmap %s: %w", path, err)
		}
		if allZero(raw[:m]) {
			continue
		}
		l := new(leaf)
		var set int64
		for w := 0; w < leafWords; w++ {
			v := binary.LittleEndian.Uint64(raw[w*8:])
			// Bits past the last unit are never set; ignore junk there.
			if lo := i*leafBits + int64(w)*64; lo+64 > n {
				if lo >= n {
					v = 0
				} else {
					v &= (1 << uint(n-lo)) - 1
				}
			}
			l[w].Store(v)
			set += int64(bits.OnesCount64(v))
		}
		if set > 0 {
			b.leaves[i].Store(l)
			b.count.Add(set)
		}
	}
	return b, nil
}

// Header returns the file's header.
func (b *Bitmap) Header() Header { return b.hdr }

// Len is the number of bits.
func (b *Bitmap) Len() int64 { return b.n }

// Count is the number of bits set.
func (b *Bitmap) Count() int64 { return b.count.Load() }

// Get reports bit i.
func (b *Bitmap) Get(i int64) bool {
	l := b.leaves[i/leafBits].Load()
	if l == nil {
		return false
	}
	return l[(i%leafBits)/64].Load()&(1<<(i%64)) != 0
}

func (b *Bitmap) leafFor(i int64) *leaf {
	p := &b.leaves[i/leafBits]
	if l := p.Load(); l != nil {
		return l
	}
	p.CompareAndSwap(nil, new(leaf))
	return p.Load()
}

// Set sets bit i and reports whether it was clear. Call it only after the
// data the bit stands for has been written (pwrite returned).
func (b *Bitmap) Set(i int64) bool {
	w := &b.leafFor(i)[(i%leafBits)/64]
	m := uint64(1) << (i % 64)
	if w.Or(m)&m != 0 {
		return false
	}
	b.count.Add(1)
	b.dirty[i/leafBits].Store(true) // after the bit: see Sync
	return true
}

// Clear clears bit i and reports whether it was set.
func (b *Bitmap) Clear(i int64) bool {
	l := b.leaves[i/leafBits].Load()
	if l == nil {
		return false
	}
	m := uint64(1) << (i % 64)
	if l[(i%leafBits)/64].And(^m)&m == 0 {
		return false
	}
	b.count.Add(-1)
	b.dirty[i/leafBits].Store(true)
	return true
}

// Err is the sticky error of a failed Sync, if any.
func (b *Bitmap) Err() error {
	b.cmu.Lock()
	defer b.cmu.Unlock()
	return b.err
}

// Sync makes durable every Set/Clear that returned before Sync was called,
// and the data file with them (even if no bit changed: a COW flush relies
// on it). Concurrent callers share rounds.
func (b *Bitmap) Sync() error {
	b.cmu.Lock()
	defer b.cmu.Unlock()
	// A round already running may have snapshotted before our changes:
	// wait for one that starts after now.
	want := b.started + 1
	for b.completed < want && b.err == nil {
		if b.running {
			b.cond.Wait()
			continue
		}
		b.running = true
		b.started++
		round := b.started
		b.cmu.Unlock()
		err := b.syncRound()
		b.cmu.Lock()
		b.running = false
		b.completed = round
		if err != nil && b.err == nil {
			b.err = err
		}
		b.cond.Broadcast()
	}
	return b.err
}

// syncRound runs with running set, so b.buf is ours.
func (b *Bitmap) syncRound() error {
	var idx []int
	buf := b.buf[:0]
	for i := range b.dirty {
		if !b.dirty[i].Load() {
			continue
		}
		b.dirty[i].Store(false) // before the copy: a racing Set re-dirties
		idx = append(idx, i)
		l := b.leaves[i].Load()
		for w := 0; w < leafWords; w++ {
			var v uint64
			if l != nil {
				v = l[w].Load()
			}
			buf = binary.LittleEndian.AppendUint64(buf, v)
		}
	}
	b.buf = buf
	if err := b.syncData(); err != nil {
		return fmt.Errorf("sync data: %w", err)
	}
	if len(idx) == 0 {
		return nil
	}
	total := (b.n + 7) / 8
	for k, i := range idx {
		off := int64(i) * leafBytes
		m := min(int64(leafBytes), total-off)
		if _, err := b.f.WriteAt(buf[k*leafBytes:int64(k*leafBytes)+m], HeaderSize+off); err != nil {
			return fmt.Errorf("write bitmap: %w", err)
		}
	}
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return fmt.Errorf("sync bitmap: %w", err)
	}
	return nil
}

// Close closes the file without syncing; call Sync first to keep changes.
func (b *Bitmap) Close() error { return b.f.Close() }

// Touch sets the file's modification time to now (last-use for eviction).
func (b *Bitmap) Touch() error {
	now := time.Now()
	return os.Chtimes(b.f.Name(), now, now)
}

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
