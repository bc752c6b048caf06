// Package stack assembles an export's layers from options: origin at the
// bottom, then the shared base cache, then the writable layer. Both
// `vmthunder export` and the daemon build exports here.
package stack

import (
	"errors"
	"fmt"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// Mode is the writable layer on top of the stack.
type Mode string

const (
	ModeReadOnly     Mode = "readonly"
	ModeCOW          Mode = "cow"
	ModeWriteThrough Mode = "write-through"
	// ModeDirect writes straight to the origin (no cache); `vmthunder export`
	// of a plain file without --cache.
	ModeDirect Mode = "direct"
)

// Options describes one export's stack.
type Options struct {
	Origin    origin.Spec
	Mode      Mode
	CacheDir  string // base cache directory; empty: no cache layer
	ChunkSize int64  // cache chunk size; 0: default
	CowPath   string // copy-on-write store (Mode == ModeCOW)
}

// ErrNotBuilt marks a layer that is not implemented yet.
var ErrNotBuilt = errors.New("layer not built yet")

// Build opens the origin and stacks the layers Options asks for. Closing
// the returned device closes everything beneath it.
func Build(o Options) (blockdev.Device, error) {
	if o.CacheDir != "" || o.Mode == ModeCOW || o.Mode == ModeWriteThrough {
		return nil, fmt.Errorf("%w: cache, cow and write-through", ErrNotBuilt)
	}
	o.Origin.ReadOnly = o.Origin.ReadOnly || o.Mode == ModeReadOnly
	return origin.Open(o.Origin)
}
