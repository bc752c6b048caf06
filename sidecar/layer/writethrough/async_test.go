package writethrough

import (
	"bytes"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

type asyncMem struct {
	Cache
	started int
}

func (m *asyncMem) ReadAtAsync(p []byte, off int64, done func(error)) {
	m.started++
	_, err := m.ReadAt(p, off)
	done(err)
}
func (m *asyncMem) Unplug() {}

// Reads through write-through take the cache's asynchronous path, and a
// cache without one leaves the layer synchronous.
func TestAsyncReadsTakeTheCachePath(t *testing.T) {
	m, err := cache.NewManager(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	org := memdev.New(1 << 20)
	org.WriteAt(bytes.Repeat([]byte{7}, 4096), 8192)
	c, err := m.Open("vol", cache.Binding{Origin: "test:vol", Writable: true}, org, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	if blockdev.AsyncOf(d) != nil && blockdev.AsyncOf(c) == nil {
		t.Fatal("an async path the cache does not have")
	}
	am := &asyncMem{Cache: c}
	d2, err := New(am)
	if err != nil {
		t.Fatal(err)
	}
	a := blockdev.AsyncOf(d2)
	if a == nil {
		t.Fatal("no async path through write-through")
	}
	p := make([]byte, 4096)
	var got error = blockdev.ErrInvalid
	a.ReadAtAsync(p, 8192, func(err error) { got = err })
	want := make([]byte, 4096)
	org.ReadAt(want, 8192)
	if got != nil || am.started != 1 || !bytes.Equal(p, want) || want[0] != 7 {
		t.Fatalf("async read: %v, %d started", got, am.started)
	}
}
