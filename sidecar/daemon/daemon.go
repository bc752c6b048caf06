// Package daemon is the sidecar daemon: the table of exports (each a layer
// stack served on its own NBD unix socket), persisted so a restart
// re-creates them at the same sockets over the same COW stores and caches;
// the HTTP/JSON API on a unix socket (package api); base warm-ups; and the
// Prometheus metrics.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/internal/unixsock"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/layer/cow"
	"github.com/vmthunder/vmthunder/sidecar/layer/metrics"
	"github.com/vmthunder/vmthunder/sidecar/nbd"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/file"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
	"github.com/vmthunder/vmthunder/sidecar/prefetch"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

// Version is the daemon's version, set at link time
// (-ldflags "-X github.com/vmthunder/vmthunder/sidecar/daemon.Version=...").
var Version = "dev"

// Export states.
const (
	stateCreating = api.StateCreating
	stateReady    = api.StateReady
	stateError    = api.StateError
)

// export is one entry of the table. Fields other than rec are guarded by
// Daemon.mu; busy marks an entry a create, delete or refresh is working on.
type export struct {
	rec   Record
	cow   string // rec.CowPath resolved (checkCow): one store may have two names
	state string
	err   error
	busy  bool

	dev *stack.Export
	top *metrics.Dev
	srv *nbd.Server
	ln  net.Listener
}

// Daemon is one running sidecar.
type Daemon struct {
	cfg *config.Config
	log *logrus.Logger
	mgr *cache.Manager
	pf  *prefetch.Manager // boot traces of template bases
	// peers is this node's place among the peers, nil unless [peers]
	// enabled (peers.go).
	peers *peerNode

	reg  *prometheus.Registry
	mset *metrics.Set
	// nbdMemory bounds the request buffers of every export's NBD server
	// together (each export has its own bound too).
	nbdMemory *nbd.MemoryBudget

	tmpl templates // template volumes in Cinder (templates.go)

	mu      sync.Mutex
	exports map[string]*export
	warms   map[string]*warmJob
	closed  bool

	lock       *os.File // flock on state_dir: one daemon per state
	apiLn      net.Listener
	apiSrv     *http.Server
	metricsLn  net.Listener
	metricsSrv *http.Server
	ctx        context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup // warm-ups and the retry loop
	ops        sync.WaitGroup // creates, deletes and refreshes under way
	serveWG    sync.WaitGroup // NBD accept loops, which end when their export closes

	// RetryInterval is how often exports that failed to come back after a
	// restart are tried again.
	RetryInterval time.Duration
}

// New prepares a daemon: directories, the state lock, the cache manager.
// Start restores the exports and opens the sockets.
func New(cfg *config.Config, log *logrus.Logger) (*Daemon, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = logrus.StandardLogger()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state_dir: %w", err)
	}
	for _, dir := range cfg.AllowedCowDirs { // state_dir/cow by default
		// Only our own directories are made here. Another one (Nova's
		// instances directory) belongs to its owner, who may remove or
		// replace it at any time: a missing one refuses its stores (the
		// create walk checks every component), it does not stop the daemon.
		if rel, err := filepath.Rel(cfg.StateDir, dir); err != nil || strings.HasPrefix(rel, "..") {
			if _, err := os.Lstat(dir); err != nil {
				log.WithField("dir", dir).Warnf("allowed_cow_dirs: %v: stores there are refused until it exists", err)
			}
			continue
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("allowed_cow_dirs: %w", err)
		}
	}
	lk, err := os.OpenFile(filepath.Join(cfg.StateDir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state_dir lock: %w", err)
	}
	if err := unix.Flock(int(lk.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lk.Close()
		return nil, fmt.Errorf("state_dir %s is in use by another vmthunder daemon", cfg.StateDir)
	}
	mgr, err := cache.NewManager(cfg.CacheDir, cfg.CacheBudget)
	if err == nil {
		err = mgr.SetNewChunkSize(cfg.ChunkSize)
	}
	if err != nil {
		lk.Close()
		return nil, err
	}
	var d *Daemon
	pf := prefetch.NewManager(prefetch.Config{Disabled: !cfg.PrefetchEnabled, RecordWindow: cfg.RecordWindow,
		Lookahead: cfg.PrefetchLookahead, Concurrency: cfg.PrefetchConcurrency, Log: log,
		Fetch: func(id string, size, _ int64) (*prefetch.Trace, string) { return d.peerTrace(id, size) }})
	d = &Daemon{cfg: cfg, log: log, mgr: mgr, pf: pf, lock: lk,
		exports: map[string]*export{}, warms: map[string]*warmJob{},
		reg: prometheus.NewRegistry(), RetryInterval: 10 * time.Second,
		nbdMemory: nbd.NewMemoryBudget(nbd.DefaultServerMemory)}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.mset = metrics.NewSet(d.reg)
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), &collector{d: d})
	return d, nil
}

// Registry is the daemon's Prometheus registry.
func (d *Daemon) Registry() *prometheus.Registry { return d.reg }

// Start re-creates the persisted exports, then listens on the API socket
// and the metrics address. Exports that fail to come back stay in the
// table in state "error" and are retried.
func (d *Daemon) Start() error {
	if err := d.prepareSocketDirs(); err != nil {
		return err
	}
	if err := d.startPeers(); err != nil { // peers.go; before the exports, whose bases use it
		return err
	}
	recs, err := loadState(d.statePath())
	if err != nil {
		return err
	}
	d.reconcile(recs)
	for _, r := range recs {
		e := &export{rec: r, state: stateCreating, busy: true}
		if r.CowPath != "" {
			e.cow, _ = d.checkCow(r.CowPath)
		}
		d.exports[r.ID] = e
	}
	for _, r := range recs {
		e := d.exports[r.ID]
		err := d.open(e)
		d.mu.Lock()
		e.busy = false
		if err != nil {
			e.state, e.err = stateError, err
			d.log.WithError(err).WithField("export", r.ID).Error("could not re-create export; will retry")
		} else {
			e.state = stateReady
			d.log.WithFields(logrus.Fields{"export": r.ID, "socket": d.socketPath(r.ID)}).Info("export re-created")
		}
		d.mu.Unlock()
	}
	d.cleanTemplateAttachments() // templates.go: attachments a crash left
	if err := d.serveAPI(); err != nil {
		d.Close()
		return err
	}
	if d.cfg.MetricsListen != "" {
		if err := d.serveMetrics(); err != nil {
			d.Close()
			return err
		}
	}
	d.wg.Add(1)
	go d.retryLoop()
	d.log.WithFields(logrus.Fields{"api": d.cfg.APISocket, "exports": len(recs), "version": Version}).Info("vmthunder daemon started")
	return nil
}

// MetricsAddr is the metrics listener's address, "" when off.
func (d *Daemon) MetricsAddr() string {
	if d.metricsLn == nil {
		return ""
	}
	return d.metricsLn.Addr().String()
}

// Close stops the API and every export (their NBD clients are cut off and
// reconnect to the next daemon), flushing them. The table on disk is kept.
func (d *Daemon) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	d.cancel()
	d.ops.Wait() // a create still opening must not start serving after this
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if d.apiSrv != nil {
		d.apiSrv.Shutdown(ctx)
	}
	if d.metricsSrv != nil {
		d.metricsSrv.Shutdown(ctx)
	}
	d.wg.Wait() // warm-ups and the retry loop
	d.mu.Lock()
	list := make([]*export, 0, len(d.exports))
	for _, e := range d.exports {
		list = append(list, e)
	}
	d.mu.Unlock()
	var errs []error
	for _, e := range list {
		if err := d.closeExport(e); err != nil {
			errs = append(errs, fmt.Errorf("export %s: %w", e.rec.ID, err))
		}
	}
	d.stopPeers()
	d.serveWG.Wait()
	d.lock.Close()
	d.log.Info("vmthunder daemon stopped")
	return errors.Join(errs...)
}

// socketPath is the export's NBD socket: NBD_SOCKET_DIR/ID.sock.
func (d *Daemon) socketPath(id string) string {
	return filepath.Join(d.cfg.NBDSocketDir, id+".sock")
}

// prepareSocketDirs makes the API socket's directory (prepareAPIDir: never
// open to nbd_group) and the NBD socket directory (0750 root:nbd_group, or
// 0755 without a group).
func (d *Daemon) prepareSocketDirs() error {
	if err := d.prepareAPIDir(); err != nil {
		return err
	}
	mode := os.FileMode(0o755)
	if d.cfg.NBDGID >= 0 {
		mode = 0o750
	}
	if err := os.MkdirAll(d.cfg.NBDSocketDir, mode); err != nil {
		return fmt.Errorf("nbd_socket_dir: %w", err)
	}
	if d.cfg.NBDGID >= 0 {
		if err := os.Chown(d.cfg.NBDSocketDir, -1, d.cfg.NBDGID); err != nil {
			return fmt.Errorf("nbd_socket_dir: %w", err)
		}
	}
	if err := os.Chmod(d.cfg.NBDSocketDir, mode); err != nil {
		return fmt.Errorf("nbd_socket_dir: %w", err)
	}
	return nil
}

// listenUnix listens at an NBD socket path for QEMU: root:nbd_group, mode
// 0660. (The API socket is listenAPI's.)
func (d *Daemon) listenUnix(path string) (net.Listener, error) {
	ln, err := unixsock.Listen(path, d.cfg.NBDGID)
	if err != nil && len(path) > unixsock.MaxPath {
		err = fmt.Errorf("%w: %v", blockdev.ErrInvalid, err)
	}
	return ln, err
}

func (r Record) spec() origin.Spec {
	return origin.Spec{URL: r.Origin, ConnectionInfo: r.ConnectionInfo}
}

// template is the template the export's base is, "" for a volume's own.
func (r Record) template() string {
	if r.Generation == "" {
		return ""
	}
	return r.Base
}

// baseID is the export's base cache id.
func (r Record) baseID() string {
	if r.Generation == "" {
		return r.Base
	}
	return stack.TemplateBaseID(r.Base, r.Generation)
}

// options are the stack options of the export.
func (d *Daemon) options(r Record) stack.Options {
	o := stack.Options{Origin: r.spec(), Mode: stack.Mode(r.Mode), Manager: d.mgr,
		Template: r.template(), Generation: r.Generation, CowPath: r.CowPath,
		Metrics: d.mset, Name: r.ID, Prefetch: d.pf, PeerSource: d.peerSource()}
	if r.TemplateVolume != "" { // templates.go: the origin is this node's attachment
		o.Origin = origin.Spec{ConnectionInfo: d.templateConnInfo(r.TemplateVolume)}
		o.OpenOrigin = d.templateOrigin(r.TemplateVolume)
		o.ChunkSize = r.ChunkSize
	}
	return o
}

// open builds the export's stack and serves it on its socket.
func (d *Daemon) open(e *export) error {
	r := e.rec
	if err := d.checkAccess(r); err != nil { // access.go: allowed_* config keys
		return err
	}
	cowPath := r.CowPath
	var cowDir *os.File // cowdir.go: the store is reached through its directory's descriptor
	if r.Mode == api.ModeCOW {
		var err error
		if cowDir, err = d.prepareCow(r.CowPath); err != nil {
			return err
		}
		defer cowDir.Close()
		cowPath = procPath(cowDir, filepath.Base(r.CowPath))
	}
	var ex *stack.Export
	err := d.withTemplate(r, func() (err error) {
		o := d.options(r) // a template's, with its attachment held
		o.CowPath = cowPath
		ex, err = stack.Build(o)
		return err
	})
	if err == nil && cowDir != nil {
		if err = d.ownCowFiles(cowDir, r.CowPath); err != nil {
			ex.Close()
			d.mset.Forget(r.ID)
		}
	}
	if err != nil && cowPath != r.CowPath {
		err = renamedErr{err, cowPath, r.CowPath} // cowdir.go
	}
	if err != nil {
		return err
	}
	d.peerServe(ex.BaseID(), ex.Cache()) // peers.go: a template base with a manifest
	top := ex.Metrics()
	srv := nbd.NewServer(d.log.WithField("export", r.ID), nbd.WithMemoryBudget(d.nbdMemory))
	if err := srv.Add(r.ID, ex); err != nil {
		ex.Close()
		d.mset.Forget(r.ID) // the stack made the export's series
		return err
	}
	ln, err := d.listenUnix(d.socketPath(r.ID))
	if err != nil {
		ex.Close()
		d.mset.Forget(r.ID)
		return fmt.Errorf("nbd socket: %w", err)
	}
	d.serveWG.Add(1)
	go func() {
		defer d.serveWG.Done()
		if err := srv.Serve(ln); err != nil {
			d.log.WithError(err).WithField("export", r.ID).Error("nbd server stopped")
		}
	}()
	d.mu.Lock()
	e.dev, e.top, e.srv, e.ln, e.err = ex, top, srv, ln, nil
	d.mu.Unlock()
	return nil
}

// closeExport stops serving and closes the stack (flushing it first).
func (d *Daemon) closeExport(e *export) error {
	d.mu.Lock()
	dev, srv, ln := e.dev, e.srv, e.ln
	e.dev, e.top, e.srv, e.ln = nil, nil, nil, nil
	d.mu.Unlock()
	if srv == nil {
		return nil
	}
	srv.Close() // closes ln (removing the socket file) and cuts the clients
	ln.Close()
	return dev.Shutdown()
}

// save writes the table; call with d.mu held.
func (d *Daemon) saveLocked() error {
	recs := make([]Record, 0, len(d.exports))
	for _, e := range d.exports {
		if e.state != stateCreating {
			recs = append(recs, e.rec)
		}
	}
	return writeState(d.statePath(), recs)
}

// Create makes an export and persists it.
func (d *Daemon) Create(req *api.CreateRequest) (*api.Export, error) {
	r := Record{ID: req.ID, Origin: req.Origin, ConnectionInfo: req.ConnectionInfo,
		Base: req.Base, Generation: req.Generation, Mode: req.Mode, CowPath: req.CowPath, TemplateVolume: req.TemplateVolume, Created: time.Now().UTC()}
	if r.TemplateVolume != "" {
		if err := d.resolveTemplate(&r); err != nil { // templates.go
			return nil, err
		}
	}
	if r.Mode == api.ModeCOW && r.CowPath == "" {
		r.CowPath = filepath.Join(d.cfg.StateDir, "cow", r.ID+".img")
	}
	if r.Generation == "" {
		id, _, err := d.options(r).Base()
		if err != nil {
			return nil, classify(err)
		}
		r.Base = id
	}
	if sp := d.socketPath(r.ID); len(sp) > 107 {
		return nil, api.BadRequest(api.CodeInvalid, "id %q is too long: socket path %s exceeds 107 bytes", r.ID, sp)
	}
	var cowReal string // refused paths are answered by checkAccess below
	if r.CowPath != "" {
		cowReal, _ = d.checkCow(r.CowPath)
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, api.Errorf(http.StatusServiceUnavailable, api.CodeConflict, "daemon is shutting down")
	}
	if _, ok := d.exports[r.ID]; ok {
		d.mu.Unlock()
		return nil, api.Errorf(http.StatusConflict, api.CodeExists, "export %q already exists", r.ID)
	}
	for _, o := range d.exports {
		if r.CowPath != "" && (o.rec.CowPath == r.CowPath || cowReal != "" && o.cow == cowReal) {
			d.mu.Unlock()
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "cow_path %s is used by export %q", r.CowPath, o.rec.ID)
		}
	}
	e := &export{rec: r, cow: cowReal, state: stateCreating, busy: true}
	d.exports[r.ID] = e
	d.ops.Add(1)
	d.mu.Unlock()
	defer d.ops.Done()

	log := d.log.WithFields(logrus.Fields{"export": r.ID, "mode": r.Mode, "base": r.baseID(),
		"origin": api.DescribeOrigin(r.Origin, r.ConnectionInfo)})
	forget := func() {
		d.mu.Lock()
		delete(d.exports, r.ID)
		d.mu.Unlock()
	}
	// A refused path is never marked, created or removed (access.go;
	// open checks again, as at restart).
	if err := d.checkAccess(r); err != nil {
		forget()
		log.WithError(err).Warn("create export refused")
		return nil, classify(err)
	}
	newStore := false
	if r.CowPath != "" {
		var err error
		if newStore, err = d.markNewStore(r.ID, r.CowPath); err != nil {
			forget()
			return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
		}
	}
	// A store this create made and no client was given goes with it.
	dropStore := func() {
		if newStore {
			if err := d.removeCow(r.CowPath, stack.RemoveCOW); err != nil {
				log.WithError(err).Warn("removing the cow store of a failed create")
			}
			d.unmarkNewStore(r.ID)
		}
	}
	if err := d.open(e); err != nil {
		dropStore()
		forget()
		log.WithError(err).Warn("create export failed")
		return nil, classify(err)
	}
	if ref := e.dev.Cache(); ref != nil && ref.Rebuilt() != "" {
		log.WithField("why", ref.Rebuilt()).Info("base cache emptied before use")
	}
	d.mu.Lock()
	e.state, e.busy = stateReady, false
	err := d.saveLocked()
	if err != nil {
		delete(d.exports, r.ID)
	}
	d.mu.Unlock()
	if err != nil {
		d.closeExport(e)
		dropStore()
		log.WithError(err).Error("create export: could not persist the table")
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "persist export table: %v", err)
	}
	if newStore {
		d.unmarkNewStore(r.ID)
	}
	log.WithField("socket", d.socketPath(r.ID)).Info("export created")
	return d.view(e), nil
}

// Get describes one export.
func (d *Daemon) Get(id string) (*api.Export, error) {
	d.mu.Lock()
	e := d.exports[id]
	d.mu.Unlock()
	if e == nil {
		return nil, notFound(id)
	}
	return d.view(e), nil
}

// List describes every export, by id.
func (d *Daemon) List() []api.Export {
	d.mu.Lock()
	list := make([]*export, 0, len(d.exports))
	for _, e := range d.exports {
		list = append(list, e)
	}
	d.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].rec.ID < list[j].rec.ID })
	out := make([]api.Export, 0, len(list))
	for _, e := range list {
		out = append(out, *d.view(e))
	}
	return out
}

func notFound(id string) error {
	return api.Errorf(http.StatusNotFound, api.CodeNotFound, "no export %q", id)
}

// acquire marks an existing, idle export busy. An export in state error
// may be busy only because the retry loop is trying it again, briefly:
// that is waited out rather than answered "busy".
func (d *Daemon) acquire(id string) (*export, error) {
	deadline := time.Now().Add(5 * time.Second)
	d.mu.Lock()
	defer d.mu.Unlock()
	for {
		e := d.exports[id]
		switch {
		case e == nil:
			return nil, notFound(id)
		case d.closed:
			return nil, api.Errorf(http.StatusServiceUnavailable, api.CodeConflict, "daemon is shutting down")
		case e.busy && e.state == stateError && time.Now().Before(deadline):
			d.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
			d.mu.Lock()
			continue
		case e.busy:
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "export %q is busy (%s); try again", id, e.state)
		}
		e.busy = true
		d.ops.Add(1)
		return e, nil
	}
}

// Delete stops and forgets an export. deleteCOW also removes its COW
// store (an instance's disk is gone for good); without it the store is kept
// and a new export with the same cow_path resumes it. A volume's base
// cache goes with its last export (see cache.Binding).
func (d *Daemon) Delete(id string, deleteCOW bool) error {
	e, err := d.acquire(id)
	if err != nil {
		return err
	}
	defer d.ops.Done()
	if deleteCOW && e.rec.CowPath != "" {
		// Only a store inside allowed_cow_dirs is removed (access.go); the
		// export is kept so the caller sees the refusal.
		if _, err := d.checkCow(e.rec.CowPath); err != nil {
			d.mu.Lock()
			e.busy = false
			d.mu.Unlock()
			return err
		}
	}
	log := d.log.WithField("export", id)
	d.stopVolumeWarm(e) // warm.go: a volume's cache goes with its last export
	if err := d.closeExport(e); err != nil {
		log.WithError(err).Warn("closing export")
	}
	d.mset.Forget(id)
	// The store goes while the export still holds its cow_path, so a
	// create with that path cannot open it in between.
	if deleteCOW && e.rec.CowPath != "" {
		if err := d.removeCow(e.rec.CowPath, stack.RemoveCOW); err != nil {
			log.WithError(err).Warn("removing cow store")
		}
	}
	d.mu.Lock()
	delete(d.exports, id)
	err = d.saveLocked()
	d.mu.Unlock()
	if err != nil {
		return api.Errorf(http.StatusInternalServerError, api.CodeInternal, "export stopped but the table could not be saved: %v", err)
	}
	log.WithField("delete_cow", deleteCOW).Info("export deleted")
	return nil
}

// Refresh re-reads the origin's size. When it changed (a Cinder volume
// was extended) the export is re-assembled at the same socket: its NBD
// clients reconnect and see the new size, and the base cache, which is
// tied to the old size, is dropped. A cow export cannot follow its base's
// size, and a base shared with other exports is not dropped under them.
func (d *Daemon) Refresh(id string) (*api.Export, error) {
	e, err := d.acquire(id)
	if err != nil {
		return nil, err
	}
	defer func() {
		d.mu.Lock()
		e.busy = false
		d.mu.Unlock()
		d.ops.Done()
	}()
	if err := d.checkAccess(e.rec); err != nil { // the origin is opened as root
		return nil, err
	}
	if e.rec.TemplateVolume != "" {
		return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "export %q is over template volume %s: its size is its generation's (publish a new template)", id, e.rec.TemplateVolume)
	}
	size, err := stack.ProbeSize(e.rec.spec())
	if err != nil {
		return nil, classify(err)
	}
	d.mu.Lock()
	failed, cur := e.state == stateError, int64(-1)
	if e.top != nil {
		cur = e.top.Size()
	}
	shared := 0
	for _, x := range d.exports {
		if x != e && x.rec.baseID() == e.rec.baseID() {
			shared++
		}
	}
	d.mu.Unlock()
	if !failed && size == cur {
		return d.view(e), nil
	}
	if !failed {
		switch {
		case e.rec.template() != "":
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "export %q is over template %s generation %s, whose size is %d: its origin now has %d bytes, so it no longer holds that generation (publish a new one)", id, e.rec.Base, e.rec.Generation, cur, size)
		case e.rec.Mode == api.ModeCOW:
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "export %q is cow over base %s: its size cannot change from %d to %d", id, e.rec.baseID(), cur, size)
		case shared > 0:
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "base %s changed size but %d other export(s) use it", e.rec.baseID(), shared)
		}
		// Its last export closing drops the volume's cache, made for the
		// old size.
		d.stopVolumeWarm(e)
		if err := d.closeExport(e); err != nil {
			d.log.WithError(err).WithField("export", id).Warn("closing export for refresh")
		}
	}
	err = d.open(e)
	d.mu.Lock()
	if err != nil {
		e.state, e.err = stateError, err
	} else {
		e.state, e.err = stateReady, nil
	}
	d.mu.Unlock()
	if err != nil {
		return nil, classify(err)
	}
	d.log.WithFields(logrus.Fields{"export": id, "old_size": cur, "size": size}).Info("export refreshed")
	return d.view(e), nil
}

// retryLoop re-tries exports that could not be re-created at start (an
// origin that was not reachable yet).
func (d *Daemon) retryLoop() {
	defer d.wg.Done()
	t := time.NewTicker(d.RetryInterval)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		d.mu.Lock()
		var todo []*export
		for _, e := range d.exports {
			if e.state == stateError && !e.busy {
				e.busy = true
				todo = append(todo, e)
			}
		}
		d.mu.Unlock()
		for _, e := range todo {
			err := d.open(e)
			d.mu.Lock()
			e.busy = false
			if err == nil {
				e.state, e.err = stateReady, nil
				d.log.WithField("export", e.rec.ID).Info("export re-created")
			} else {
				e.err = err
			}
			d.mu.Unlock()
		}
	}
}

// view is the API's picture of an export.
func (d *Daemon) view(e *export) *api.Export {
	d.mu.Lock()
	defer d.mu.Unlock()
	sock := d.socketPath(e.rec.ID)
	v := &api.Export{ID: e.rec.ID, Mode: e.rec.Mode, Base: e.rec.baseID(), Template: e.rec.template(), Generation: e.rec.Generation,
		Socket: sock, ExportName: e.rec.ID, URI: "nbd+unix:///" + e.rec.ID + "?socket=" + sock,
		Origin: api.DescribeOrigin(e.rec.Origin, e.rec.ConnectionInfo), CowPath: e.rec.CowPath, State: e.state,
		TemplateVolume: e.rec.TemplateVolume}
	if e.rec.TemplateVolume != "" {
		v.Origin = d.describeTemplate(e.rec.TemplateVolume) // templates.go
	}
	if e.err != nil {
		v.Error = e.err.Error()
	}
	if e.top != nil {
		v.Size = e.top.Size()
		c := e.top.Counters()
		st := &api.ExportStats{ReadOps: c.ReadOps, WriteOps: c.WriteOps, ReadBytes: c.ReadBytes,
			WriteBytes: c.WriteBytes, Errors: c.Errors}
		if ref := e.dev.Cache(); ref != nil {
			st.CacheHitBytes, st.OriginBytes = ref.Tally()
		}
		v.Stats = st
	}
	return v
}

// classify maps an error from building an export to an API error.
func classify(err error) error {
	var ae *api.Error
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, origin.ErrBadSpec):
		return api.BadRequest(api.CodeBadOrigin, "%v", err)
	case errors.Is(err, cache.ErrConflict):
		return api.Errorf(http.StatusConflict, api.CodeBaseConflict, "%v", err)
	case errors.Is(err, cache.ErrMismatch), errors.Is(err, cache.ErrInUse), errors.Is(err, cow.ErrMismatch), errors.Is(err, cow.ErrInUse):
		return api.Errorf(http.StatusConflict, api.CodeConflict, "%v", err)
	case errors.Is(err, blockdev.ErrInvalid):
		return api.BadRequest(api.CodeInvalid, "%v", err)
	case errors.Is(err, iscsi.ErrAuth), errors.Is(err, iscsi.ErrDenied):
		return api.Errorf(http.StatusBadGateway, api.CodeAuthFailed, "%v", err)
	case errors.Is(err, iscsi.ErrUnreachable), errors.Is(err, iscsi.ErrTimeout):
		return api.Errorf(http.StatusBadGateway, api.CodeUnreachable, "%v", err)
	case errors.Is(err, iscsi.ErrTargetNotFound), errors.Is(err, iscsi.ErrNoLUN):
		return api.Errorf(http.StatusBadGateway, api.CodeNoSuchTarget, "%v", err)
	case errors.Is(err, os.ErrNotExist), errors.Is(err, os.ErrPermission), errors.Is(err, file.ErrNotADisk):
		return api.BadRequest(api.CodeOriginError, "%v", err)
	}
	return api.Errorf(http.StatusBadGateway, api.CodeOriginError, "%v", err)
}
