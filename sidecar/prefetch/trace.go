package prefetch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// Trace is the order in which a boot first read a base's chunks: chunk
// indexes (of ChunkSize bytes), each once, with the milliseconds since the
// boot's first read. It holds no data.
type Trace struct {
	ChunkSize int64
	Size      int64    // the base's size
	Chunks    []int64  // first-read order
	MS        []uint32 // per entry, non-decreasing
}

// Limits of a trace file: it is read from disk and from API callers.
const (
	MaxEntries   = 1 << 20
	MaxFileBytes = 16 << 20
)

const magic = "VMTTRACE1\n"

// ErrFormat is wrapped by every decoding error.
var ErrFormat = errors.New("not a valid trace")

// Duration is the time from the first read to the last recorded one.
func (t *Trace) Duration() uint32 {
	if len(t.MS) == 0 {
		return 0
	}
	return t.MS[len(t.MS)-1]
}

// Bytes is the data the trace's chunks cover.
func (t *Trace) Bytes() int64 {
	var n int64
	for _, c := range t.Chunks {
		n += min(t.ChunkSize, t.Size-c*t.ChunkSize)
	}
	return n
}

// Encode is the trace's file form: a magic line, chunk size, base size and
// count as uvarints, each entry as a zigzag delta of the chunk index and a
// uvarint delta of the milliseconds, then a CRC-32 of all of it.
func (t *Trace) Encode() ([]byte, error) {
	if err := t.validate(); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.WriteString(magic)
	b.Write(binary.AppendUvarint(nil, uint64(t.ChunkSize)))
	b.Write(binary.AppendUvarint(nil, uint64(t.Size)))
	b.Write(binary.AppendUvarint(nil, uint64(len(t.Chunks))))
	var prevC int64
	var prevMS uint32
	buf := make([]byte, 0, 2*binary.MaxVarintLen64)
	for i, c := range t.Chunks {
		buf = binary.AppendVarint(buf[:0], c-prevC)
		buf = binary.AppendUvarint(buf, uint64(t.MS[i]-prevMS))
		b.Write(buf)
		prevC, prevMS = c, t.MS[i]
	}
	b.Write(binary.LittleEndian.AppendUint32(nil, crc32.ChecksumIEEE(b.Bytes())))
	return b.Bytes(), nil
}

// Sum is the checksum a trace file ends with (CRC-32 of the rest).
func Sum(raw []byte) uint32 {
	if len(raw) < 4 {
		return 0
	}
	return binary.LittleEndian.Uint32(raw[len(raw)-4:])
}

// Decode reads a trace's file form and checks it.
func Decode(raw []byte) (*Trace, error) {
	if len(raw) > MaxFileBytes {
		return nil, fmt.Errorf("%w: %d bytes, the limit is %d", ErrFormat, len(raw), MaxFileBytes)
	}
	if len(raw) < len(magic)+4 || string(raw[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w: no trace header", ErrFormat)
	}
	body, sum := raw[:len(raw)-4], binary.LittleEndian.Uint32(raw[len(raw)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return nil, fmt.Errorf("%w: checksum mismatch (damaged)", ErrFormat)
	}
	r := bytes.NewReader(body[len(magic):])
	u := func() uint64 {
		v, err := binary.ReadUvarint(r)
		if err != nil {
			panic(err)
		}
		return v
	}
	t := &Trace{}
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("%w: truncated", ErrFormat)
			}
		}()
		cs, size, n := u(), u(), u()
		if cs > 64<<20 || size > 1<<60 || n > MaxEntries {
			err = fmt.Errorf("%w: chunk size %d, size %d, %d entries out of bounds", ErrFormat, cs, size, n)
			return
		}
		// Each entry takes at least two bytes: a count the file cannot
		// hold is not allocated for (a trace is API input).
		if n > uint64(r.Len())/2 {
			err = fmt.Errorf("%w: truncated: %d entries in %d bytes", ErrFormat, n, r.Len())
			return
		}
		t.ChunkSize, t.Size = int64(cs), int64(size)
		t.Chunks, t.MS = make([]int64, 0, n), make([]uint32, 0, n)
		var c int64
		var ms uint64
		for i := uint64(0); i < n; i++ {
			d, derr := binary.ReadVarint(r)
			if derr != nil {
				panic(derr)
			}
			c += d
			ms += u()
			if ms > 1<<32-1 {
				err = fmt.Errorf("%w: time stamp out of bounds", ErrFormat)
				return
			}
			t.Chunks, t.MS = append(t.Chunks, c), append(t.MS, uint32(ms))
		}
		if r.Len() != 0 {
			err = fmt.Errorf("%w: %d bytes after the entries", ErrFormat, r.Len())
		}
	}()
	if err != nil {
		return nil, err
	}
	if err := t.validate(); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Trace) validate() error {
	cs := t.ChunkSize
	if cs < 4096 || cs > 64<<20 || cs&(cs-1) != 0 {
		return fmt.Errorf("%w: chunk size %d is not a power of two between 4 KiB and 64 MiB", ErrFormat, cs)
	}
	if t.Size <= 0 {
		return fmt.Errorf("%w: base size %d", ErrFormat, t.Size)
	}
	if len(t.Chunks) != len(t.MS) || len(t.Chunks) > MaxEntries {
		return fmt.Errorf("%w: %d entries", ErrFormat, len(t.Chunks))
	}
	n := (t.Size + cs - 1) / cs
	seen := make(map[int64]bool, len(t.Chunks))
	for i, c := range t.Chunks {
		switch {
		case c < 0 || c >= n:
			return fmt.Errorf("%w: entry %d: chunk %d outside a base of %d chunks", ErrFormat, i, c, n)
		case seen[c]:
			return fmt.Errorf("%w: entry %d: chunk %d twice", ErrFormat, i, c)
		case i > 0 && t.MS[i] < t.MS[i-1]:
			return fmt.Errorf("%w: entry %d: time goes back", ErrFormat, i)
		}
		seen[c] = true
	}
	return nil
}

// Fits reports why t cannot be replayed on a base of size bytes ("" if it
// can): a trace is of one content, so of one size.
func (t *Trace) Fits(size int64) error {
	if t.Size != size {
		return fmt.Errorf("%w: the trace is of a base of %d bytes, this base has %d", blockdev.ErrInvalid, t.Size, size)
	}
	return nil
}

// Rechunk is the trace's order in chunks of cs bytes (the cache's), each
// once, with the time of the first entry that covers it. Like a recorded
// trace it has at most MaxEntries entries (the first ones): a trace of
// large chunks on a cache of small ones would otherwise cost memory in
// proportion to the base's size.
func (t *Trace) Rechunk(cs int64) (chunks []int64, ms []uint32) {
	seen := map[int64]bool{}
	for i, c := range t.Chunks {
		off := c * t.ChunkSize
		end := min(off+t.ChunkSize, t.Size)
		for k := off / cs; k <= (end-1)/cs; k++ {
			if len(chunks) >= MaxEntries {
				return chunks, ms
			}
			if !seen[k] {
				seen[k] = true
				chunks, ms = append(chunks, k), append(ms, t.MS[i])
			}
		}
	}
	return chunks, ms
}

// Path is the trace file of the base whose cache directory is dir.
func Path(dir string) string { return filepath.Join(dir, cache.TraceFile) }

// Load reads the trace of the base in dir; an error wrapping
// os.ErrNotExist when it has none.
func Load(dir string) (*Trace, error) {
	f, err := os.Open(Path(dir))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	raw, err := readLimited(f)
	if err != nil {
		return nil, err
	}
	t, err := Decode(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", Path(dir), err)
	}
	return t, nil
}

func readLimited(f *os.File) ([]byte, error) {
	raw, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(raw) > MaxFileBytes {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrFormat, MaxFileBytes)
	}
	return raw, nil
}

// Save writes t as the trace of the base in dir, atomically.
func Save(dir string, t *Trace) error {
	raw, err := t.Encode()
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(Path(dir), raw, 0o600); err != nil {
		return fmt.Errorf("save trace: %w", err)
	}
	return nil
}

// Remove deletes the trace of the base in dir (none: no error).
func Remove(dir string) error {
	if err := os.Remove(Path(dir)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return fsutil.SyncDir(dir)
}
