// Package stack assembles an export's layers from options: origin at the
// bottom, then the shared base cache, then the writable layer, then the
// metrics layer. Both `vmthunder export` and the daemon build exports
// here, and only here; it also decides what base an export uses (see
// Options.Base and cache.Binding).
package stack

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/layer/cow"
	"github.com/vmthunder/vmthunder/sidecar/layer/metrics"
	"github.com/vmthunder/vmthunder/sidecar/layer/writethrough"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/prefetch"
)

// Mode is the writable layer on top of the stack.
type Mode string

const (
	ModeReadOnly     Mode = api.ModeReadOnly
	ModeCOW          Mode = api.ModeCOW
	ModeWriteThrough Mode = api.ModeWriteThrough
	// ModeDirect writes straight to the origin (no cache); `vmthunder export`
	// of a plain file without --cache. The API does not offer it.
	ModeDirect Mode = "direct"
)

// Options describes one export's stack.
type Options struct {
	Origin    origin.Spec
	Mode      Mode   // empty: cow if CowPath is set, else readonly with a cache, else direct
	CacheDir  string // base cache directory; empty: no cache layer (unless Manager is set)
	ChunkSize int64  // cache chunk size; 0: the existing cache's, or the manager's default
	CowPath   string // copy-on-write store (Mode == ModeCOW)

	// Manager shares base caches between exports (the daemon has one per
	// node, with its size budget). Nil with CacheDir set: one manager per
	// directory per process, without a budget.
	Manager *cache.Manager
	// Template and Generation name the read-only content the base holds
	// (an image published as a template volume): every export of one
	// generation on the node shares its cache, which outlives them. Empty:
	// the base is the origin volume's own, kept only while it has exports
	// (see cache.Binding).
	Template, Generation string
	// ClusterSize is the cow bitmap granularity; 0: default (4 KiB).
	ClusterSize int64
	// Metrics, when set, counts the export's I/O as Name at the top of
	// the stack.
	Metrics *metrics.Set
	Name    string
	// Prefetch records a boot trace of a template base that has none and
	// replays the trace of one that has (package prefetch); nil: neither.
	// Volume bases never have traces (their cache dies with their exports).
	Prefetch *prefetch.Manager
	// OpenOrigin opens the origin; nil: OpenOrigin. Tests put a memdev
	// here; the daemon may hand out origins it manages.
	OpenOrigin func(origin.Spec) (blockdev.Device, error)
	// PeerSource, when set, makes the source of a template base's cache
	// when the base is opened: it wraps the origin (the daemon's is a
	// peers.Source when [peers] is enabled and the base has a manifest)
	// and owns it. It is never asked for a volume's base: a volume's
	// bytes are its own and are never shared between nodes.
	PeerSource func(baseID string, bind cache.Binding, origin blockdev.Device) (blockdev.Device, error)
}

// source opens the cache's source of base id: the origin, wrapped by
// PeerSource for a template base.
func (o Options) source(id string, bind cache.Binding, spec origin.Spec) func() (blockdev.Device, error) {
	return func() (blockdev.Device, error) {
		d, err := o.openOrigin(spec)
		if err != nil || o.PeerSource == nil || !bind.IsTemplate() {
			return d, err
		}
		return o.PeerSource(id, bind, d)
	}
}

// openOrigin opens spec with Options.OpenOrigin, or OpenOrigin.
func (o Options) openOrigin(spec origin.Spec) (blockdev.Device, error) {
	if o.OpenOrigin != nil {
		return o.OpenOrigin(spec)
	}
	return OpenOrigin(spec)
}

// Export is the device Build returns: the top layer, plus handles the
// daemon wants for metrics and warm-up. Close closes the whole stack:
// the writable layer, then the reference on the base cache (the last
// reference closes the cache and the origin), or the origin.
type Export struct {
	blockdev.Device
	mode   Mode
	baseID string          // "" without a cache
	base   *cache.Ref      // nil without a cache
	cow    *cow.Dev        // nil unless Mode is cow
	meter  *metrics.Dev    // nil without Options.Metrics
	upper  blockdev.Device // the writable layer (cow, write-through), nil without one
	below  blockdev.Device
}

// Metrics is the export's metrics layer, nil without one.
func (e *Export) Metrics() *metrics.Dev { return e.meter }

// Unwrap is the top layer: Export passes every call to it.
func (e *Export) Unwrap() blockdev.Device { return e.Device }

// Cache is the export's base cache, nil without one.
func (e *Export) Cache() *cache.Ref { return e.base }

// BaseID is the base cache's id (its directory name), "" without a cache.
func (e *Export) BaseID() string { return e.baseID }

// COW is the export's copy-on-write layer, nil in other modes.
func (e *Export) COW() *cow.Dev { return e.cow }

// Mode is the export's writable layer.
func (e *Export) Mode() Mode { return e.mode }

func (e *Export) Close() error {
	var err error
	if e.upper != nil {
		err = e.upper.Close()
	}
	return errors.Join(err, e.below.Close())
}

// Shutdown flushes what the export acknowledged (all but readonly) and
// closes it.
func (e *Export) Shutdown() error {
	var errs []error
	if e.mode != ModeReadOnly {
		if err := e.Device.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush: %w", err))
		}
	}
	if err := e.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close: %w", err))
	}
	return errors.Join(errs...)
}

// ResolveMode is the mode Options asks for, with the defaults applied,
// after checking it fits the other options.
func (o Options) ResolveMode() (Mode, error) {
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
			return "", fmt.Errorf("%w: mode cow needs a store path (--cow FILE)", blockdev.ErrInvalid)
		}
	case ModeDirect:
		if useCache {
			return "", fmt.Errorf("%w: mode direct has no cache; use write-through to write a cached origin", blockdev.ErrInvalid)
		}
	default:
		return "", fmt.Errorf("%w: unknown mode %q (readonly, cow, write-through, direct)", blockdev.ErrInvalid, mode)
	}
	if o.CowPath != "" && mode != ModeCOW {
		return "", fmt.Errorf("%w: a cow store is given but the mode is %s", blockdev.ErrInvalid, mode)
	}
	if o.Template == "" && o.Generation != "" {
		return "", fmt.Errorf("%w: a generation is given without a template base", blockdev.ErrInvalid)
	}
	if o.Template != "" {
		switch {
		case !useCache:
			return "", fmt.Errorf("%w: a template base needs a cache", blockdev.ErrInvalid)
		case o.Generation == "":
			return "", fmt.Errorf("%w: template base %q needs its content generation (the bytes a cache of it holds must be one version)", blockdev.ErrInvalid, o.Template)
		case mode == ModeWriteThrough:
			return "", fmt.Errorf("%w: template base %q is read-only content: write-through would change it under every export sharing it (use cow, or no base for a volume)", blockdev.ErrInvalid, o.Template)
		}
	}
	return mode, nil
}

// Base is the base cache an export uses: its id and what it holds.
func (o Options) Base() (string, cache.Binding, error) {
	mode, err := o.ResolveMode()
	if err != nil {
		return "", cache.Binding{}, err
	}
	return o.base(mode)
}

func (o Options) base(mode Mode) (string, cache.Binding, error) {
	key, err := o.Origin.Key()
	if err != nil {
		return "", cache.Binding{}, err
	}
	if o.Template != "" {
		b := cache.Binding{Template: o.Template, Generation: o.Generation, Origin: key}
		return TemplateBaseID(o.Template, o.Generation), b, nil
	}
	return VolumeBaseID(key), cache.Binding{Origin: key, Writable: mode == ModeWriteThrough}, nil
}

// originSpec is the origin as mode opens it: read-only unless written
// through (or written directly).
func (o Options) originSpec(mode Mode) origin.Spec {
	spec := o.Origin
	spec.ReadOnly = spec.ReadOnly || mode == ModeReadOnly || mode == ModeCOW
	return spec
}

// OpenBase opens only the base cache the export would use (for a
// warm-up): a reference the caller closes.
func (o Options) OpenBase() (*cache.Ref, error) {
	mode, err := o.ResolveMode()
	if err != nil {
		return nil, err
	}
	_, _, r, err := o.openBase(mode, o.originSpec(mode))
	return r, err
}

// openBase opens the base cache of an export in mode, filled from spec.
func (o Options) openBase(mode Mode, spec origin.Spec) (string, cache.Binding, *cache.Ref, error) {
	m := o.Manager
	if m == nil {
		if o.CacheDir == "" {
			return "", cache.Binding{}, nil, fmt.Errorf("%w: no cache to open a base in", blockdev.ErrInvalid)
		}
		var err error
		if m, err = dirManager(o.CacheDir); err != nil {
			return "", cache.Binding{}, nil, err
		}
	}
	id, bind, err := o.base(mode)
	if err != nil {
		return "", cache.Binding{}, nil, err
	}
	r, err := m.OpenFunc(id, bind, o.ChunkSize, o.source(id, bind, spec))
	return id, bind, r, err
}

// Build opens the origin and stacks the layers Options asks for.
func Build(o Options) (*Export, error) {
	mode, err := o.ResolveMode()
	if err != nil {
		return nil, err
	}
	useCache := o.CacheDir != "" || o.Manager != nil
	spec := o.originSpec(mode)
	if mode == ModeWriteThrough && spec.ReadOnly {
		return nil, fmt.Errorf("%w: write-through needs a writable origin", blockdev.ErrInvalid)
	}

	e := &Export{mode: mode}
	if useCache {
		id, bind, r, err := o.openBase(mode, spec)
		if err != nil {
			return nil, err
		}
		e.baseID, e.base, e.below = id, r, r
		if bind.IsTemplate() && o.Prefetch != nil {
			e.below = o.Prefetch.Attach(id, r) // closing it closes r
		}
	} else {
		d, err := o.openOrigin(spec)
		if err != nil {
			return nil, err
		}
		e.below = d
	}

	e.Device = e.below
	switch {
	case mode == ModeCOW:
		c, err := cow.Open(o.CowPath, e.below, cow.Options{ClusterSize: o.ClusterSize})
		if err != nil {
			e.below.Close()
			return nil, err
		}
		e.Device, e.cow, e.upper = c, c, c
	case mode == ModeWriteThrough && e.base != nil:
		w, err := writethrough.New(e.base)
		if err != nil {
			e.below.Close()
			return nil, err
		}
		e.Device, e.upper = w, w
	}
	if o.Metrics != nil {
		e.meter = metrics.Wrap(e.Device, o.Metrics, o.Name)
		e.Device = e.meter
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

// TemplateBaseID names the base of one template generation: the template
// id, and a hash of the generation (any string), so each generation has
// its own cache and an older one is never served for a newer.
func TemplateBaseID(template, generation string) string {
	sum := sha256.Sum256([]byte(generation))
	return template + ".g" + hex.EncodeToString(sum[:6])
}

// VolumeBaseID names a volume's base after its origin key (see
// origin.Spec.Key): one id for one volume however it is named (URL or
// connection_info, any portal), readable, and without credentials.
func VolumeBaseID(key string) string {
	sum := sha256.Sum256([]byte(key))
	name := key
	if i := strings.LastIndexAny(name, "/:"); i >= 0 && strings.HasPrefix(key, "path:") {
		name = name[i+1:]
	} else if rest, ok := strings.CutPrefix(key, "iscsi:"); ok {
		// iqn....:volume-<uuid>:<lun>: the IQN's last part and the LUN.
		if i := strings.LastIndex(rest, ":"); i > 0 {
			iqn, lun := rest[:i], rest[i+1:]
			if j := strings.LastIndexAny(iqn, ":."); j >= 0 {
				iqn = iqn[j+1:]
			}
			name = iqn + "-" + lun
		}
	}
	name = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, name)
	if len(name) > 64 {
		name = name[len(name)-64:]
	}
	return "vol-" + strings.TrimLeft(name, ".") + "-" + hex.EncodeToString(sum[:8])
}
