package writethrough

import "github.com/vmthunder/vmthunder/sidecar/blockdev"

// asyncDev is the layer's asynchronous read path: its reads are the
// cache's, so they take the cache's path.
type asyncDev struct {
	*Dev
	cache blockdev.AsyncReader
}

// Unwrap returns the asynchronous read path, or nil when the cache has
// none.
func (d *Dev) Unwrap() blockdev.Device {
	a := blockdev.AsyncOf(d.c)
	if a == nil {
		return nil
	}
	return &asyncDev{Dev: d, cache: a}
}

func (a *asyncDev) ReadAtAsync(p []byte, off int64, done func(error)) {
	a.cache.ReadAtAsync(p, off, done)
}

func (a *asyncDev) Unplug() { a.cache.Unplug() }
