package writethrough

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

type flushCount struct {
	*memdev.Dev
	flushes *atomic.Int32
}

func (f flushCount) Flush() error { f.flushes.Add(1); return nil }

func TestWritesReachOrigin(t *testing.T) {
	m, err := cache.NewManager(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	org := memdev.New(1 << 20)
	var flushes atomic.Int32
	r, err := m.Open("vol", cache.Binding{Origin: "test:vol", Writable: true}, flushCount{org, &flushes}, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(r)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Caps().ReadOnly || !d.Caps().Flush {
		t.Fatalf("caps %+v", d.Caps())
	}
	d.ReadAt(make([]byte, 1<<20), 0) // everything cached
	msg := []byte("acknowledged means on the origin")
	if _, err := d.WriteAt(msg, 65530); err != nil { // across two cached chunks
		t.Fatal(err)
	}
	if !bytes.Equal(org.Bytes()[65530:][:len(msg)], msg) {
		t.Fatal("write acknowledged before the origin had it")
	}
	got := make([]byte, len(msg))
	d.ReadAt(got, 65530)
	if !bytes.Equal(got, msg) {
		t.Fatalf("cache served %q after the write", got)
	}
	if err := d.Flush(); err != nil || flushes.Load() != 1 {
		t.Fatalf("flush not passed to the origin: %v, %d", err, flushes.Load())
	}
	if err := d.WriteZeroes(65530, 10); err != nil {
		t.Fatal(err)
	}
	d.ReadAt(got, 65530)
	if !bytes.Equal(got[:10], make([]byte, 10)) || !bytes.Equal(org.Bytes()[65530:][:10], make([]byte, 10)) {
		t.Fatal("write-zeroes not on origin and cache")
	}
}

func TestReadOnlySourceRefused(t *testing.T) {
	m, _ := cache.NewManager(t.TempDir(), 0)
	r, _ := m.Open("tmpl", cache.Binding{Template: "tmpl", Generation: "1", Origin: "test:tmpl"}, memdev.FromBytes(make([]byte, 1<<20), true), 0)
	defer r.Close()
	if _, err := New(r); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("write-through over a read-only source: %v", err)
	}
}
