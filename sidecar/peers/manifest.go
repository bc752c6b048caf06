package peers

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
)

// ErrManifest is wrapped by every manifest that cannot be used: malformed,
// too large, or not the one that was expected.
var ErrManifest = errors.New("bad chunk manifest")

// A Manifest is the sha256 of every chunk of one template generation. A
// chunk from a peer is used only if it hashes to its entry here, so the
// manifest's own trust must not come from a peer: it is computed from the
// origin (when the template is published or first warmed) or read from a
// file that came with the template, and may be pinned by its Root (the
// generation of a template can be that root).
type Manifest struct {
	Size      int64 // the base's size in bytes
	ChunkSize int64 // bytes per chunk; the last chunk may be short
	sums      [][sha256.Size]byte
}

// Limits of a manifest, so a damaged file cannot size buffers: at most
// 1<<22 chunks (1 TiB of 256 KiB chunks, a 128 MiB manifest).
const (
	maxManifestChunks = 1 << 22
	manifestMagic     = "VMTMANI1"
	manifestHeader    = 8 + 8 + 8 // magic, size, chunk size
)

func validChunkSize(c int64) bool { return c >= 4096 && c <= 64<<20 && c&(c-1) == 0 }

func chunksOf(size, chunk int64) int64 { return (size + chunk - 1) / chunk }

func checkGeometry(size, chunk int64) error {
	switch {
	case !validChunkSize(chunk):
		return fmt.Errorf("%w: chunk size %d is not a power of two between 4 KiB and 64 MiB", ErrManifest, chunk)
	case size <= 0:
		return fmt.Errorf("%w: base size %d", ErrManifest, size)
	case chunksOf(size, chunk) > maxManifestChunks:
		return fmt.Errorf("%w: %d bytes in %d-byte chunks is more than %d chunks", ErrManifest, size, chunk, maxManifestChunks)
	}
	return nil
}

// Chunks is the number of chunks.
func (m *Manifest) Chunks() int64 { return int64(len(m.sums)) }

// Span is chunk c's offset and length.
func (m *Manifest) Span(c int64) (off, n int64) {
	off = c * m.ChunkSize
	return off, min(m.ChunkSize, m.Size-off)
}

// Verify reports whether p is chunk c: its full length and its digest.
func (m *Manifest) Verify(c int64, p []byte) bool {
	if c < 0 || c >= m.Chunks() {
		return false
	}
	if _, n := m.Span(c); int64(len(p)) != n {
		return false
	}
	sum := sha256.Sum256(p)
	return subtle.ConstantTimeCompare(sum[:], m.sums[c][:]) == 1
}

// Sum is chunk c's digest.
func (m *Manifest) Sum(c int64) [sha256.Size]byte { return m.sums[c] }

// MarshalBinary is the manifest's file format: "VMTMANI1", the size and
// the chunk size (big-endian int64), then one sha256 per chunk.
func (m *Manifest) MarshalBinary() ([]byte, error) {
	out := make([]byte, manifestHeader, manifestHeader+len(m.sums)*sha256.Size)
	copy(out, manifestMagic)
	binary.BigEndian.PutUint64(out[8:], uint64(m.Size))
	binary.BigEndian.PutUint64(out[16:], uint64(m.ChunkSize))
	for i := range m.sums {
		out = append(out, m.sums[i][:]...)
	}
	return out, nil
}

// ParseManifest reads the file format; it checks every bound before it
// allocates.
func ParseManifest(raw []byte) (*Manifest, error) {
	if len(raw) < manifestHeader || string(raw[:8]) != manifestMagic {
		return nil, fmt.Errorf("%w: not a manifest (no %s header)", ErrManifest, manifestMagic)
	}
	size, chunk := int64(binary.BigEndian.Uint64(raw[8:])), int64(binary.BigEndian.Uint64(raw[16:]))
	if err := checkGeometry(size, chunk); err != nil {
		return nil, err
	}
	n := chunksOf(size, chunk)
	if int64(len(raw)-manifestHeader) != n*sha256.Size {
		return nil, fmt.Errorf("%w: %d bytes of digests for %d chunks", ErrManifest, len(raw)-manifestHeader, n)
	}
	m := &Manifest{Size: size, ChunkSize: chunk, sums: make([][sha256.Size]byte, n)}
	for i := range m.sums {
		copy(m.sums[i][:], raw[manifestHeader+i*sha256.Size:])
	}
	return m, nil
}

// Root is the manifest's own digest, "sha256:<hex>" of its file format:
// one string that pins every chunk of the generation.
func (m *Manifest) Root() string {
	raw, _ := m.MarshalBinary()
	sum := sha256.Sum256(raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// ReadManifestFile reads a manifest; with wantRoot set, one whose Root is
// not wantRoot is refused.
func ReadManifestFile(path, wantRoot string) (*Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, manifestHeader+maxManifestChunks*sha256.Size+1))
	if err != nil {
		return nil, fmt.Errorf("read manifest %s: %w", path, err)
	}
	m, err := ParseManifest(raw)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	if wantRoot != "" && m.Root() != wantRoot {
		return nil, fmt.Errorf("%w: %s has root %s, want %s", ErrManifest, path, m.Root(), wantRoot)
	}
	return m, nil
}

// WriteFile writes the manifest atomically (durable when it returns).
func (m *Manifest) WriteFile(path string) error {
	raw, _ := m.MarshalBinary()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(path, raw, 0o600)
}

// Equal reports whether two manifests describe the same bytes.
func (m *Manifest) Equal(o *Manifest) bool {
	a, _ := m.MarshalBinary()
	b, _ := o.MarshalBinary()
	return bytes.Equal(a, b)
}

// ComputeManifest reads all of dev (the origin: the one place a
// manifest's trust can come from) in chunks of chunk bytes, with a few
// reads in flight, and returns their digests.
func ComputeManifest(ctx context.Context, dev blockdev.Device, chunk int64) (*Manifest, error) {
	size := dev.Size()
	if err := checkGeometry(size, chunk); err != nil {
		return nil, err
	}
	m := &Manifest{Size: size, ChunkSize: chunk, sums: make([][sha256.Size]byte, chunksOf(size, chunk))}
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	const workers = 4
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for {
				c := next.Add(1) - 1
				if c >= m.Chunks() {
					return
				}
				if err := ctx.Err(); err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				off, n := m.Span(c)
				if _, err := dev.ReadAt(buf[:n], off); err != nil {
					once.Do(func() { firstErr = fmt.Errorf("manifest: read chunk %d (offset %d): %w", c, off, err) })
					next.Store(m.Chunks()) // stop the others
					return
				}
				m.sums[c] = sha256.Sum256(buf[:n])
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	return m, nil
}

// MaxManifestBytes is the largest manifest file (maxManifestChunks
// digests and the header): what a manifest fetched from a peer or read
// from a volume is bounded by.
const MaxManifestBytes = manifestHeader + maxManifestChunks*sha256.Size

// ManifestFileSize reads a manifest file's header (its first 24 bytes at
// least) and returns the whole file's length, so a reader of a device
// that holds one (a manifest volume, padded to blocks) knows where it
// ends. The geometry is checked as ParseManifest checks it.
func ManifestFileSize(head []byte) (int64, error) {
	if len(head) < manifestHeader || string(head[:8]) != manifestMagic {
		return 0, fmt.Errorf("%w: not a manifest (no %s header)", ErrManifest, manifestMagic)
	}
	size, chunk := int64(binary.BigEndian.Uint64(head[8:])), int64(binary.BigEndian.Uint64(head[16:]))
	if err := checkGeometry(size, chunk); err != nil {
		return 0, err
	}
	return manifestHeader + chunksOf(size, chunk)*sha256.Size, nil
}

// ManifestWriter makes a manifest from the bytes of a base written to it
// in order (an io.Writer), so a publisher that reads a volume back for
// another reason digests its chunks in the same pass.
type ManifestWriter struct {
	m    *Manifest
	h    hash.Hash
	c    int64 // the chunk being hashed
	left int64 // its bytes still to come
}

// NewManifestWriter expects size bytes, in chunks of chunk bytes.
func NewManifestWriter(size, chunk int64) (*ManifestWriter, error) {
	if err := checkGeometry(size, chunk); err != nil {
		return nil, err
	}
	m := &Manifest{Size: size, ChunkSize: chunk, sums: make([][sha256.Size]byte, chunksOf(size, chunk))}
	_, first := m.Span(0)
	return &ManifestWriter{m: m, h: sha256.New(), left: first}, nil
}

// Write digests the next len(p) bytes of the base; bytes past its size
// are an error.
func (w *ManifestWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		if w.c >= w.m.Chunks() {
			return n, fmt.Errorf("%w: more than the base's %d bytes written", ErrManifest, w.m.Size)
		}
		k := min(int64(len(p)), w.left)
		w.h.Write(p[:k])
		p, n, w.left = p[k:], n+int(k), w.left-k
		if w.left == 0 {
			w.h.Sum(w.m.sums[w.c][:0])
			w.h.Reset()
			if w.c++; w.c < w.m.Chunks() {
				_, w.left = w.m.Span(w.c)
			}
		}
	}
	return n, nil
}

// Manifest is the result, once every byte of the base was written.
func (w *ManifestWriter) Manifest() (*Manifest, error) {
	if w.c < w.m.Chunks() {
		off, _ := w.m.Span(w.c)
		return nil, fmt.Errorf("%w: %d of the base's %d bytes written", ErrManifest, off, w.m.Size)
	}
	return w.m, nil
}
