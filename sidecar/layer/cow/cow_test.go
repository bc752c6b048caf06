package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

func base(size int) *memdev.Dev {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i%251) | 1 // never zero, so a zero read is not the base
	}
	return memdev.FromBytes(b, true)
}

func open(t *testing.T, path string, b blockdev.Device) *Dev {
	t.Helper()
	d, err := Open(path, b, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func read(t *testing.T, d blockdev.Device, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if _, err := d.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestWriteTrimResume(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.cow")
	b := base(1<<20 + 300)
	d := open(t, path, b)
	want := bytes.Clone(b.Bytes())
	put := func(off int64, p []byte) {
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	put(100, []byte("partial write inside one cluster"))
	put(4090, bytes.Repeat([]byte{'x'}, 9000)) // straddles three clusters
	put(1<<20+250, []byte("tail of a short last cluster"))
	if err := d.Trim(7000, 20000); err != nil { // partial clusters both ends
		t.Fatal(err)
	}
	clear(want[7000:27000])
	if err := d.WriteZeroes(1<<20-10, 310); err != nil { // to the end
		t.Fatal(err)
	}
	clear(want[1<<20-10:])
	if got := read(t, d, 0, d.Size()); !bytes.Equal(got, want) {
		t.Fatal("reads differ from what was written")
	}
	if !bytes.Equal(b.Bytes(), base(1<<20+300).Bytes()) {
		t.Fatal("the base was modified")
	}
	if st := d.Stats(); st.ReadModifyWrite == 0 || st.ClustersPresent == 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = open(t, path, b)
	defer d.Close()
	if got := read(t, d, 0, d.Size()); !bytes.Equal(got, want) {
		t.Fatal("a reopened store lost data")
	}
}

// Store and bitmap as a crash leaves them: whatever was flushed is there.
func TestFlushedSurvivesWithoutClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.cow")
	b := base(1 << 20)
	d := open(t, path, b)
	d.WriteAt([]byte("flushed"), 5000)
	d.Trim(64<<10, 64<<10)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	// No Close: a second instance, after the first one's process died (its
	// lock is gone), reads what is on disk (page cache).
	unix.Flock(int(d.store.Fd()), unix.LOCK_UN)
	d2 := open(t, path, b)
	defer d2.Close()
	if got := read(t, d2, 5000, 7); string(got) != "flushed" {
		t.Fatalf("read %q", got)
	}
	if got := read(t, d2, 64<<10, 64<<10); !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Fatal("a trimmed range fell through to the base")
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	b := base(1 << 20)
	path := filepath.Join(dir, "vm.cow")
	d := open(t, path, b)
	d.Close()
	if _, err := Open(path, base(2<<20), Options{}); !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "made for a base of 1048576") {
		t.Fatalf("other base size: %v", err)
	}
	if _, err := Open(path, b, Options{ClusterSize: 65536}); !errors.Is(err, ErrMismatch) {
		t.Fatalf("other cluster size: %v", err)
	}
	os.Truncate(path, 1000)
	if _, err := Open(path, b, Options{}); !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "store file") {
		t.Fatalf("store too small: %v", err)
	}
	// A file with data and no bitmap is not ours: never overwritten.
	other := filepath.Join(dir, "precious.img")
	os.WriteFile(other, []byte("do not touch"), 0o600)
	if _, err := Open(other, b, Options{}); err == nil || !strings.Contains(err.Error(), "not a cow store") {
		t.Fatalf("foreign file: %v", err)
	}
	if got, _ := os.ReadFile(other); string(got) != "do not touch" {
		t.Fatal("a foreign file was changed")
	}
	// A sparse store without bitmap (a crash during create) is adopted.
	sparse := filepath.Join(dir, "new.cow")
	os.WriteFile(sparse, nil, 0o600)
	os.Truncate(sparse, 1<<20)
	d, err := Open(sparse, b, Options{ClusterSize: 512})
	if err != nil {
		t.Fatalf("sparse store without bitmap: %v", err)
	}
	d.Close()
	if _, err := Open(filepath.Join(dir, "x"), b, Options{ClusterSize: 1000}); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("bad cluster size: %v", err)
	}
}

func TestReadAllocs(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "vm.cow"), base(1<<20))
	defer d.Close()
	d.WriteAt(make([]byte, 8192), 0)
	p := make([]byte, 16384)
	if n := testing.AllocsPerRun(100, func() { d.ReadAt(p, 0) }); n != 0 {
		t.Fatalf("a read allocates %v times", n)
	}
}

// A store is open in one place at a time: a second opener is refused, not
// allowed to flush its own bitmap over the first one's writes.
func TestSecondOpenRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.cow")
	base := memdev.FromBytes(make([]byte, 1<<20), true)
	a, err := Open(path, base, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, base, Options{}); !errors.Is(err, ErrInUse) {
		t.Fatalf("second open: %v, want ErrInUse", err)
	}
	a.Close()
	b, err := Open(path, base, Options{})
	if err != nil {
		t.Fatalf("open after close: %v", err)
	}
	b.Close()
}

// A symlink at the store's path is not followed.
func TestStoreSymlinkRefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "victim")
	os.WriteFile(target, []byte("keep"), 0o600)
	link := filepath.Join(dir, "vm.cow")
	os.Symlink(target, link)
	if _, err := Open(link, memdev.FromBytes(make([]byte, 1<<20), true), Options{}); err == nil {
		t.Fatal("opened a store through a symlink")
	}
	if got, _ := os.ReadFile(target); string(got) != "keep" {
		t.Fatal("symlink target changed")
	}
}
