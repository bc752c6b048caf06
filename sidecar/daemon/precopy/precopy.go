// Package precopy copies an origin (a path or an iscsi:// URL) whole into a
// local file or block device: the classic pre-copy that on-demand attach
// avoids, for an image that must be local before use, and as a baseline in
// benchmarks.
package precopy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/vmthunder/vmthunder/sidecar/stack"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// Options tune a copy.
type Options struct {
	// BlockSize is the unit of each read; 0: 4 MiB.
	BlockSize int64
	// Workers read in parallel (a network origin overlaps round trips); 0: 4.
	Workers int
	// Progress is called with bytes done and the total, from one goroutine
	// at a time.
	Progress func(done, total int64)
}

// Copy reads src and writes it to dst. A regular dst is written to
// dst.part, sparse (zero blocks are skipped), fsynced and renamed into
// place, so dst is either absent, the old file, or a complete copy. A block
// device dst is written in place and must be large enough. It returns the
// bytes copied.
func Copy(ctx context.Context, src, dst string, o Options) (int64, error) {
	if o.BlockSize <= 0 {
		o.BlockSize = 4 << 20
	}
	if o.Workers <= 0 {
		o.Workers = 4
	}
	if !filepath.IsAbs(src) && !isURL(src) {
		if abs, err := filepath.Abs(src); err == nil {
			src = abs
		}
	}
	if !isURL(src) {
		a, errA := os.Stat(src)
		b, errB := os.Stat(dst)
		if errA == nil && errB == nil && os.SameFile(a, b) {
			return 0, fmt.Errorf("%w: %s", ErrSame, dst)
		}
		// A regular dst is written to dst.part (opened O_TRUNC), so a
		// source that is that file would be wiped before it is read.
		if errB != nil || b.Mode()&os.ModeDevice == 0 {
			if p, err := os.Stat(dst + ".part"); errA == nil && err == nil && os.SameFile(a, p) {
				return 0, fmt.Errorf("%w: %s.part", ErrSame, dst)
			}
		}
	}
	in, err := stack.OpenOrigin(origin.Spec{URL: src, ReadOnly: true})
	if err != nil {
		return 0, err
	}
	defer in.Close()
	size := in.Size()

	blockDev := false
	if st, err := os.Stat(dst); err == nil && st.Mode()&os.ModeDevice != 0 {
		blockDev = true
	}
	var out *os.File
	target := dst
	if blockDev {
		if out, err = os.OpenFile(dst, os.O_WRONLY, 0); err != nil {
			return 0, err
		}
		end, err := out.Seek(0, 2)
		if err != nil {
			out.Close()
			return 0, err
		}
		if end < size {
			out.Close()
			return 0, fmt.Errorf("%s holds %d bytes, the source has %d", dst, end, size)
		}
	} else {
		target = dst + ".part"
		if out, err = os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644); err != nil {
			return 0, err
		}
		if err := out.Truncate(size); err != nil {
			out.Close()
			os.Remove(target)
			return 0, err
		}
	}
	fail := func(err error) (int64, error) {
		out.Close()
		if !blockDev {
			os.Remove(target)
		}
		return 0, err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next, done atomic.Int64
	var mu sync.Mutex // serialises Progress and records the first error
	var firstErr error
	var wg sync.WaitGroup
	for w := 0; w < o.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, o.BlockSize)
			zero := make([]byte, o.BlockSize)
			for ctx.Err() == nil {
				off := next.Add(o.BlockSize) - o.BlockSize
				if off >= size {
					return
				}
				n := min(o.BlockSize, size-off)
				err := func() error {
					if _, err := in.ReadAt(buf[:n], off); err != nil {
						return fmt.Errorf("read %s at %d: %w", origin.Spec{URL: src}, off, err)
					}
					if !blockDev && bytes.Equal(buf[:n], zero[:n]) {
						return nil // the truncated file already reads as zeroes
					}
					if _, err := out.WriteAt(buf[:n], off); err != nil {
						return fmt.Errorf("write %s: %w", target, err)
					}
					return nil
				}()
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					cancel()
				} else if o.Progress != nil {
					o.Progress(done.Add(n), size)
				} else {
					done.Add(n)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return fail(firstErr)
	}
	if err := out.Sync(); err != nil {
		return fail(fmt.Errorf("fsync %s: %w", target, err))
	}
	if err := out.Close(); err != nil {
		return fail(err)
	}
	if !blockDev {
		if err := os.Rename(target, dst); err != nil {
			os.Remove(target)
			return 0, err
		}
		if d, err := os.Open(filepath.Dir(dst)); err == nil {
			d.Sync()
			d.Close()
		}
	}
	return size, nil
}

func isURL(s string) bool { return strings.Contains(s, "://") }

// ErrSame is returned when source and destination are one file.
var ErrSame = errors.New("source and destination are the same file")
