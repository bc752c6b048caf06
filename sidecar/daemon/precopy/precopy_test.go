package precopy

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 10<<20+123) // an odd size: the last block is short
	rand.Read(data[:1<<20])
	rand.Read(data[9<<20:])
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst.raw")
	var calls int
	var last int64
	n, err := Copy(context.Background(), src, dst, Options{BlockSize: 1 << 20, Progress: func(done, total int64) {
		calls++
		if done < last || total != int64(len(data)) {
			t.Errorf("progress %d/%d after %d", done, total, last)
		}
		last = done
	}})
	if err != nil || n != int64(len(data)) {
		t.Fatalf("copy: %d %v", n, err)
	}
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, data) {
		t.Fatal("copy differs")
	}
	if calls != 11 || last != int64(len(data)) {
		t.Errorf("progress: %d calls, last %d", calls, last)
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if st.Blocks*512 > 4<<20 {
		t.Errorf("zero blocks were written: %d bytes allocated", st.Blocks*512)
	}
	if _, err := Copy(context.Background(), dst, dst, Options{}); !errors.Is(err, ErrSame) {
		t.Errorf("copy onto itself: %v", err)
	}
}

func TestCopyCanceled(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	os.WriteFile(src, make([]byte, 8<<20), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dst := filepath.Join(dir, "dst.raw")
	if _, err := Copy(ctx, src, dst, Options{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled copy: %v", err)
	}
	for _, p := range []string{dst, dst + ".part"} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
}

// A source that is the destination's temporary file (dst.part) is not
// truncated: the copy refuses it like a copy onto itself.
func TestCopyFromPartFile(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "img.raw")
	src := dst + ".part"
	data := make([]byte, 1<<20)
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Copy(context.Background(), src, dst, Options{}); !errors.Is(err, ErrSame) {
		t.Errorf("copy from dst.part: %v", err)
	}
	if got, _ := os.ReadFile(src); !bytes.Equal(got, data) {
		if got, _ := os.ReadFile(dst); !bytes.Equal(got, data) {
			t.Fatal("the source was destroyed and the copy differs")
		}
	}
}
