package daemon

import (
	"context"
	"errors"
	"github.com/vmthunder/vmthunder/sidecar/stack"
	"net/http"
	"os"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/prefetch"
)

// warmJob is a base's current or last warm-up; status is guarded by
// Daemon.mu. ref is held while it runs, so the cache stays open (and its
// counters are visible) even with no export.
type warmJob struct {
	status api.WarmStatus
	ref    *cache.Ref
	cancel context.CancelFunc
	done   chan struct{} // closed once the job holds no reference on the base
}

// Warm starts copying the whole base into the cache in the background. A
// warm-up that is running is not started twice; its status is returned.
// The base is an export's (its origin and binding are the export's), or,
// with a generation in the request, a template warmed from the request's
// origin before any export of it. A volume's cache lives only while it has
// an export, so a volume is not warmed without one.
func (d *Daemon) Warm(base string, req *api.WarmRequest) (*api.WarmStatus, error) {
	if err := api.ValidBase(base); err != nil {
		return nil, err
	}
	var opts stack.Options
	found := false
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, api.Errorf(http.StatusServiceUnavailable, api.CodeConflict, "daemon is shutting down")
	}
	// Close waits for ops before it waits for warm-ups (wg), so the
	// warm-up this may start is counted before that wait.
	d.ops.Add(1)
	defer d.ops.Done()
	for _, e := range d.exports {
		if e.rec.baseID() == base || (req.Generation != "" && e.rec.template() == base && e.rec.Generation == req.Generation) {
			opts, found = d.options(e.rec), true
			break
		}
	}
	d.mu.Unlock()
	if !found {
		if req.Generation == "" || (req.Origin == "" && req.ConnectionInfo == nil) {
			return nil, api.BadRequest(api.CodeMissingField, "base %q has no export on this node: to warm a template before its first export, give \"generation\" and \"origin\" or \"connection_info\" (a volume's cache lives only while it has an export)", base)
		}
		if err := api.ValidGeneration(req.Generation); err != nil {
			return nil, err
		}
		// The request's origin is opened as root like an export's (access.go).
		if err := d.checkAccess(Record{Origin: req.Origin, ConnectionInfo: req.ConnectionInfo}); err != nil {
			return nil, classify(err)
		}
		// Opened as an export of the template would open it (peers included).
		opts = d.options(Record{Origin: req.Origin, ConnectionInfo: req.ConnectionInfo,
			Base: base, Generation: req.Generation, Mode: api.ModeReadOnly})
	}
	id, _, err := opts.Base()
	if err != nil {
		return nil, classify(err)
	}
	d.mu.Lock()
	if j := d.warms[id]; j != nil && j.status.State == api.WarmRunning {
		st := j.status
		d.mu.Unlock()
		return &st, nil
	}
	// A volume's cache lives only while it has an export: warm it only
	// for an export that is not going away (Delete stops the warm-up of
	// its base's last export, stopVolumeWarm), checked with the claim.
	if opts.Template == "" && !d.volumeServedLocked(id, nil) {
		d.mu.Unlock()
		return nil, api.BadRequest(api.CodeMissingField, "base %q has no ready export on this node (a volume's cache lives only while it has an export)", base)
	}
	wctx, cancel := context.WithCancel(d.ctx)
	j := &warmJob{status: api.WarmStatus{Base: id, State: api.WarmRunning, Started: time.Now().UTC().Format(time.RFC3339)},
		cancel: cancel, done: make(chan struct{})}
	d.warms[id] = j // claims the base: a second request sees it running
	d.mu.Unlock()
	base = id
	abandon := func() {
		d.mu.Lock()
		delete(d.warms, id)
		d.mu.Unlock()
		cancel()
		close(j.done)
	}

	ref, err := opts.OpenBase()
	if err != nil {
		abandon()
		return nil, classify(err)
	}
	d.peerServe(id, ref) // peers.go
	fill, total := ref.Warm, ref.Size()
	if req.TraceOnly {
		// Opening the base dropped a trace of other content (cache.TraceFile).
		t, err := prefetch.Load(ref.Dir())
		if err != nil {
			ref.Close()
			abandon()
			if errors.Is(err, os.ErrNotExist) {
				return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "base %s has no boot trace to warm (boot it once, or import one: vmthunder trace import)", id)
			}
			return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
		}
		fill = func(ctx context.Context, progress func(done, total int64)) error {
			return prefetch.WarmTrace(ctx, ref.Base, progress)
		}
		total = t.Bytes()
	}
	d.mu.Lock()
	j.ref = ref
	j.status.TotalBytes = total
	st := j.status
	d.mu.Unlock()
	log := d.log.WithField("base", base)
	log.WithField("bytes", st.TotalBytes).Info("warm-up started")

	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer close(j.done)
		defer cancel()
		err := fill(wctx, func(done, total int64) {
			d.mu.Lock()
			j.status.DoneBytes, j.status.TotalBytes = done, total
			d.mu.Unlock()
		})
		d.mu.Lock()
		j.status.Finished = time.Now().UTC().Format(time.RFC3339)
		if err != nil {
			j.status.State, j.status.Error = api.WarmFailed, err.Error()
		} else {
			j.status.State, j.status.DoneBytes = api.WarmDone, j.status.TotalBytes
		}
		j.ref = nil
		d.mu.Unlock()
		if cerr := ref.Close(); cerr != nil {
			log.WithError(cerr).Warn("closing warmed base")
		}
		switch {
		case errors.Is(err, context.Canceled):
			log.Info("warm-up stopped (daemon shutdown, or the volume's last export went)")
		case err != nil:
			log.WithError(err).Error("warm-up failed")
		default:
			log.Info("warm-up done")
		}
	}()
	return &st, nil
}

// volumeServedLocked reports whether volume base id has a ready export
// other than skip that no delete or refresh is working on; d.mu held.
func (d *Daemon) volumeServedLocked(id string, skip *export) bool {
	for _, e := range d.exports {
		if e != skip && e.rec.baseID() == id && e.state == stateReady && !e.busy {
			return true
		}
	}
	return false
}

// stopVolumeWarm stops the warm-up of e's base when e is a volume's last
// export and is going (delete, or a refresh re-assembling it), and waits
// until the warm-up holds no reference: the volume's cache must go with
// its last export, not live on in the warm-up to be served to the next
// one after the volume changed elsewhere. e is busy (acquire).
func (d *Daemon) stopVolumeWarm(e *export) {
	if e.rec.template() != "" {
		return
	}
	id := e.rec.baseID()
	d.mu.Lock()
	j := d.warms[id]
	if j == nil || d.volumeServedLocked(id, e) {
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()
	j.cancel()
	<-j.done
}

// openBases are the bases open now, for stats: every export's and every
// running warm-up's, once each.
func (d *Daemon) openBases() map[string]*cache.Ref {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]*cache.Ref{}
	for _, e := range d.exports {
		if e.dev != nil && e.dev.Cache() != nil {
			out[e.rec.baseID()] = e.dev.Cache()
		}
	}
	for id, j := range d.warms {
		if j.ref != nil {
			out[id] = j.ref
		}
	}
	return out
}

// Bases lists the caches in the cache directory.
func (d *Daemon) Bases() ([]api.Base, error) {
	infos, err := d.mgr.List()
	if err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	open := d.openBases()
	d.mu.Lock()
	users := map[string]int{}
	for _, e := range d.exports {
		users[e.rec.baseID()]++
	}
	out := make([]api.Base, 0, len(infos))
	seen := map[string]bool{}
	for _, inf := range infos {
		b := api.Base{ID: inf.ID, Size: inf.Size, ChunkSize: inf.ChunkSize, DiskBytes: inf.BytesOnDisk,
			InUse: inf.Refs > 0, Exports: users[inf.ID]}
		// Without an open cache the bitmap is not read; the blocks on disk
		// are a close upper bound.
		b.PresentBytes = min(inf.BytesOnDisk, inf.Size)
		if r := open[inf.ID]; r != nil {
			b.PresentBytes = r.Stats().BytesPresent
		}
		if j := d.warms[inf.ID]; j != nil {
			st := j.status
			b.Warm = &st
		}
		d.peerView(&b) // peers.go
		seen[inf.ID] = true
		out = append(out, b)
	}
	// A warm-up that failed before its cache existed is still worth showing.
	for id, j := range d.warms {
		if !seen[id] {
			st := j.status
			out = append(out, api.Base{ID: id, Warm: &st})
		}
	}
	d.mu.Unlock()
	return out, nil
}

// Base describes one base.
func (d *Daemon) Base(id string) (*api.Base, error) {
	if err := api.ValidBase(id); err != nil {
		return nil, err
	}
	l, err := d.Bases()
	if err != nil {
		return nil, err
	}
	for i := range l {
		if l[i].ID == id {
			return &l[i], nil
		}
	}
	return nil, api.Errorf(http.StatusNotFound, api.CodeNotFound, "no base %q in the cache", id)
}

// DeleteBase removes a base's cache; 409 while an export or warm-up uses it.
func (d *Daemon) DeleteBase(id string) error {
	if err := api.ValidBase(id); err != nil {
		return err
	}
	if _, err := d.Base(id); err != nil {
		return err
	}
	if err := d.mgr.Remove(id); err != nil {
		return classify(err)
	}
	d.mu.Lock()
	if j := d.warms[id]; j != nil && j.status.State != api.WarmRunning {
		delete(d.warms, id)
	}
	d.mu.Unlock()
	d.pf.Forget(id)
	d.log.WithField("base", id).Info("base cache removed")
	return nil
}

// Stats are the node's totals.
func (d *Daemon) Stats() api.Stats {
	var s api.Stats
	open := d.openBases()
	for _, r := range open {
		cs := r.Stats()
		s.CacheHits += cs.Hits
		s.CacheMisses += cs.Misses
		s.CacheHitBytes += cs.BytesFromCache
		s.OriginBytes += cs.BytesFromSource
		s.WriteThroughByte += cs.WriteThrough
	}
	if infos, err := d.mgr.List(); err == nil {
		s.Bases = len(infos)
		for _, inf := range infos {
			s.CacheDiskBytes += inf.BytesOnDisk
		}
	}
	s.CacheBudget = d.cfg.CacheBudget
	d.mu.Lock()
	defer d.mu.Unlock()
	s.Exports = len(d.exports)
	for _, e := range d.exports {
		if e.top != nil {
			c := e.top.Counters()
			s.ReadOps += c.ReadOps
			s.WriteOps += c.WriteOps
			s.ReadBytes += c.ReadBytes
			s.WriteBytes += c.WriteBytes
			s.Errors += c.Errors
		}
	}
	return s
}
