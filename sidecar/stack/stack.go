// Package stack assembles an export's layers from options: origin at the
// bottom, then the shared base cache, then the writable layer. Both
// `vmthunder export` and the daemon build exports here.
package stack

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/layer/cow"
	"github.com/vmthunder/vmthunder/sidecar/layer/writethrough"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
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
	Mode      Mode   // empty: cow if CowPath is set, else readonly with a cache, else direct
	CacheDir  string // base cache directory; empty: no cache layer (unless Manager is set)
	ChunkSize int64  // cache chunk size; 0: the existing cache's, or the default
	CowPath   string // copy-on-write store (Mode == ModeCOW)

	// Manager shares base caches between exports (the daemon has one per
	// node, with its size budget). Nil with CacheDir set: one manager per
	// directory per process, without a budget.
	Manager *cache.Manager
	// BaseID names the base in the cache (a template volume or image id).
	// Empty: derived from Origin.URL.
	BaseID string
	// ClusterSize is the cow bitmap granularity; 0: default (4 KiB).
	ClusterSize int64
	// OpenOrigin opens the origin; nil: OpenOrigin. Tests put a memdev
	// here; the daemon may hand out origins it manages.
	OpenOrigin func(origin.Spec) (blockdev.Device, error)
}

// ErrNotBuilt marks a layer that is not implemented yet.
var ErrNotBuilt = errors.New("layer not built yet")

// Export is the device Build returns: the top layer, plus handles the
// daemon wants for metrics and warm-up. Close closes the whole stack:
// the writable layer, then the reference on the base cache (the last
// reference closes the cache and the origin), or the origin.
type Export struct {
	blockdev.Device
	base  *cache.Ref // nil without a cache
	cow   *cow.Dev   // nil unless Mode is cow
	below blockdev.Device
}

// Unwrap is the top layer: Export passes every call to it.
func (e *Export) Unwrap() blockdev.Device { return e.Device }

// Cache is the export's base cache, nil without one.
func (e *Export) Cache() *cache.Ref { return e.base }

// COW is the export's copy-on-write layer, nil in other modes.
func (e *Export) COW() *cow.Dev { return e.cow }

func (e *Export) Close() error {
	var err error
	if e.Device != e.below {
		err = e.Device.Close()
	}
	return errors.Join(err, e.below.Close())
}

// Build opens the origin and stacks the layers Options asks for.
func Build(o Options) (blockdev.Device, error) {
	useCache := o.CacheDir != "" || o.Manager != nil
	mode := o.Mode
	if mode == "" {
		switch {
		case o.CowPath != "":
			mode = ModeCOW
		case useCache:
			mode = ModeReadOnly
		default:
			mode = ModeDirect
		}
	}
	switch mode {
	case ModeReadOnly, ModeWriteThrough:
	case ModeCOW:
		if o.CowPath == "" {
			return nil, fmt.Errorf("%w: mode cow needs a store path (--cow FILE)", blockdev.ErrInvalid)
		}
	case ModeDirect:
		if useCache {
			return nil, fmt.Errorf("%w: mode direct has no cache; use write-through to write a cached origin", blockdev.ErrInvalid)
		}
	default:
		return nil, fmt.Errorf("%w: unknown mode %q (readonly, cow, write-through, direct)", blockdev.ErrInvalid, mode)
	}
	if o.CowPath != "" && mode != ModeCOW {
		return nil, fmt.Errorf("%w: a cow store is given but the mode is %s", blockdev.ErrInvalid, mode)
	}
	spec := o.Origin
	spec.ReadOnly = spec.ReadOnly || mode == ModeReadOnly || mode == ModeCOW
	if mode == ModeWriteThrough && spec.ReadOnly {
		return nil, fmt.Errorf("%w: write-through needs a writable origin", blockdev.ErrInvalid)
	}

	openOrigin := o.OpenOrigin
	if openOrigin == nil {
		openOrigin = OpenOrigin
	}
	var below blockdev.Device
	var ref *cache.Ref
	if useCache {
		m := o.Manager
		if m == nil {
			var err error
			if m, err = dirManager(o.CacheDir); err != nil {
				return nil, err
			}
		}
		id := o.BaseID
		if id == "" {
			var err error
			if id, err = DeriveBaseID(spec); err != nil {
				return nil, err
			}
		}
		r, err := m.OpenFunc(id, o.ChunkSize, func() (blockdev.Device, error) { return openOrigin(spec) })
		if err != nil {
			return nil, err
		}
		ref, below = r, r
	} else {
		d, err := openOrigin(spec)
		if err != nil {
			return nil, err
		}
		below = d
	}

	e := &Export{Device: below, base: ref, below: below}
	switch {
	case mode == ModeCOW:
		c, err := cow.Open(o.CowPath, below, cow.Options{ClusterSize: o.ClusterSize})
		if err != nil {
			below.Close()
			return nil, err
		}
		e.Device, e.cow = c, c
	case mode == ModeWriteThrough && ref != nil:
		w, err := writethrough.New(ref)
		if err != nil {
			below.Close()
			return nil, err
		}
		e.Device = w
	}
	return e, nil
}

// dirManagers are the managers Build makes for a bare CacheDir, one per
// directory, so exports of one base in one process share it (a second
// manager would find the cache locked as if by another process).
var (
	dirMu       sync.Mutex
	dirManagers = map[string]*cache.Manager{}
)

func dirManager(dir string) (*cache.Manager, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("cache directory %s: %w", dir, err)
	}
	dirMu.Lock()
	defer dirMu.Unlock()
	if m := dirManagers[abs]; m != nil {
		return m, nil
	}
	m, err := cache.NewManager(abs, 0)
	if err == nil {
		dirManagers[abs] = m
	}
	return m, err
}

// DeriveBaseID names a base after its origin when no id is given: a
// readable prefix and a hash of the URL without credentials, so two paths
// with one file name do not share a cache.
func DeriveBaseID(spec origin.Spec) (string, error) {
	if spec.URL == "" {
		return "", fmt.Errorf("%w: a cache over connection_info needs a base id", blockdev.ErrInvalid)
	}
	key := spec.URL
	if is, err := iscsi.ParseURL(spec.URL); err == nil && len(is.Portals) > 0 {
		// The target and LUN name the volume; the portal and the
		// credentials do not (and the password must not reach a file name).
		key = fmt.Sprintf("iscsi/%s/%d", is.Portals[0].IQN, is.Portals[0].LUN)
	} else if rest, ok := strings.CutPrefix(spec.URL, "iscsi://"); ok {
		// Unparsable, but it may still hold user%password@ (which
		// url.Parse often refuses): drop it as ParseURL would, up to the
		// last '@', before the URL is hashed or named after.
		if at := strings.LastIndex(rest, "@"); at >= 0 {
			rest = rest[at+1:]
		}
		key = "iscsi://" + rest
	} else if u, err := url.Parse(spec.URL); err == nil && u.Scheme != "" {
		u.User = nil
		key = u.String()
	} else if abs, err := filepath.Abs(spec.URL); err == nil {
		key = abs
	}
	sum := sha256.Sum256([]byte(key))
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, filepath.Base(key))
	if len(name) > 64 {
		name = name[:64]
	}
	return strings.TrimLeft(name, ".") + "-" + hex.EncodeToString(sum[:8]), nil
}
