package delay

import (
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

func TestDelaysReadsAndWrites(t *testing.T) {
	d := New(memdev.New(4096), 20*time.Millisecond, 40*time.Millisecond)
	start := time.Now()
	if _, err := d.WriteAt([]byte("abc"), 0); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 40*time.Millisecond {
		t.Fatalf("write took %v, want >= 40ms", el)
	}
	buf := make([]byte, 3)
	start = time.Now()
	if _, err := d.ReadAt(buf, 0); err != nil || string(buf) != "abc" {
		t.Fatalf("read %q %v", buf, err)
	}
	if el := time.Since(start); el < 20*time.Millisecond {
		t.Fatalf("read took %v, want >= 20ms", el)
	}
}
