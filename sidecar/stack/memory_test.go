package stack

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// TestMemoryPerExport opens exports (cache + cow) of a 10 GiB sparse base
// and measures the Go heap each costs, after each has read and written a
// little. The goal is well under 1 MiB; bench-cache.sh prints the figure.
func TestMemoryPerExport(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "base.img")
	if err := os.WriteFile(src, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 10<<30); err != nil {
		t.Fatal(err)
	}
	m, err := cache.NewManager(filepath.Join(dir, "cache"), 0)
	if err != nil {
		t.Fatal(err)
	}
	const n = 32
	// One export first, so the shared base is not charged to the others.
	open := func(i int) blockdev.Device {
		d, err := Build(Options{Origin: origin.Spec{URL: src}, Manager: m, Template: "big", Generation: "1", Mode: ModeCOW,
			CowPath: filepath.Join(dir, fmt.Sprintf("vm%d.cow", i))})
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 4096)
		for _, off := range []int64{0, 1 << 30, 5 << 30} {
			if _, err := d.ReadAt(p, off); err != nil {
				t.Fatal(err)
			}
			if _, err := d.WriteAt(p, off+8192); err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	first := open(n)
	defer first.Close()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	devs := make([]blockdev.Device, n)
	for i := range devs {
		devs[i] = open(i)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n
	fmt.Printf("MEMORY_PER_EXPORT_BYTES %d\n", per)
	t.Logf("heap per open export of a 10 GiB base: %d bytes", per)
	for _, d := range devs {
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if per > 256<<10 {
		t.Fatalf("an export of a 10 GiB base costs %d bytes of heap, want well under 1 MiB", per)
	}
}
