package cache

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache/pbitmap"
	"golang.org/x/sys/unix"
)

// ErrInUse is returned when removing a base that is open.
var ErrInUse = errors.New("base cache is in use")

// Manager keeps one cache per base under a directory (DIR/<baseID>/) and
// hands it out by reference, so every export of a base on the node shares
// one instance. With a budget, bases no export uses are evicted, least
// recently used first, when the directory holds more than the budget; a
// base in use is never evicted (so the budget can be exceeded by bases in
// use).
type Manager struct {
	dir       string
	budget    int64
	mu        sync.Mutex
	open      map[string]*entry
	closing   map[string]chan struct{} // closed when that base's last close is done
	approx    atomic.Int64             // bytes cached, refreshed by each eviction pass
	evicting  atomic.Bool
	lastEvict atomic.Int64 // unix ns of the last pass started by a fill
	newChunk  atomic.Int64 // chunk size of new caches opened with chunk 0
}

// SetNewChunkSize sets the chunk size of new caches opened without one
// (existing caches keep theirs, so changing it does not make them
// unusable). 0: DefaultChunkSize.
func (m *Manager) SetNewChunkSize(n int64) error {
	if n != 0 && !validChunk(n) {
		return fmt.Errorf("%w: chunk size %d must be a power of two between 4 KiB and 64 MiB", blockdev.ErrInvalid, n)
	}
	m.newChunk.Store(n)
	return nil
}

type entry struct {
	ready chan struct{} // closed when base or err is set
	base  *Base
	err   error
	refs  int
	bind  Binding
}

// NewManager uses dir (created if missing). budget <= 0: no limit.
func NewManager(dir string, budget int64) (*Manager, error) {
	if dir == "" {
		return nil, fmt.Errorf("%w: empty cache directory", blockdev.ErrInvalid)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cache directory %s: %w", dir, err)
	}
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return nil, fmt.Errorf("cache directory %s is not writable: %w", dir, err)
	}
	m := &Manager{dir: dir, budget: budget, open: map[string]*entry{}, closing: map[string]chan struct{}{}}
	m.Evict()
	return m, nil
}

// Dir is the manager's directory.
func (m *Manager) Dir() string { return m.dir }

// Ref is one user's handle on a shared Base; it is the blockdev.Device an
// export stacks on. Close releases the reference; the last release syncs
// and closes the cache and its source.
type Ref struct {
	*Base
	m     *Manager
	id    string
	once  sync.Once
	tally Tally
}

// ReadAt reads through the shared base, counting for this reference.
func (r *Ref) ReadAt(p []byte, off int64) (int, error) { return r.readAt(p, off, &r.tally) }

// Tally is what this reference's reads cost (bytes from cache, from source).
func (r *Ref) Tally() (fromCache, fromSource uint64) {
	return r.tally.FromCache.Load(), r.tally.FromSource.Load()
}

func (r *Ref) Close() error {
	var err error
	r.once.Do(func() { err = r.m.release(r.id) })
	return err
}

// ValidID reports whether id can name a base (it becomes a directory name).
func ValidID(id string) error {
	ok := len(id) > 0 && len(id) <= 200 && id != "." && id != ".."
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("%w: base id %q (want 1-200 of [A-Za-z0-9._-])", blockdev.ErrInvalid, id)
	}
	return nil
}

// Open returns a reference to baseID's cache of bind's content, filled from
// source. The caller hands source over: if the base is already open, its
// existing source is kept and this one is closed at once. chunk 0: the
// existing cache's chunk size, or DefaultChunkSize.
func (m *Manager) Open(baseID string, bind Binding, source blockdev.Device, chunk int64) (*Ref, error) {
	used := false
	r, err := m.OpenFunc(baseID, bind, chunk, func() (blockdev.Device, error) { used = true; return source, nil })
	if !used {
		source.Close()
	}
	return r, err
}

// OpenFunc is Open with the source opened only when the base is not open
// yet (an iSCSI login is not made just to be dropped). A base open with
// another binding is refused (ErrConflict); a cache on disk that does not
// hold bind's content is emptied first (see Binding).
func (m *Manager) OpenFunc(baseID string, bind Binding, chunk int64, open func() (blockdev.Device, error)) (*Ref, error) {
	if err := ValidID(baseID); err != nil {
		return nil, err
	}
	if err := bind.validate(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	// A base whose last reference is still closing holds its directory
	// lock: wait for it rather than fail as if another process had it.
	for ch := m.closing[baseID]; ch != nil; ch = m.closing[baseID] {
		m.mu.Unlock()
		<-ch
		m.mu.Lock()
	}
	e := m.open[baseID]
	if e != nil {
		if err := e.bind.conflict(baseID, bind); err != nil {
			m.mu.Unlock()
			return nil, err
		}
		e.refs++
		m.mu.Unlock()
		<-e.ready
		if e.err == nil && chunk != 0 && chunk != e.base.chunk {
			m.release(baseID)
			return nil, fmt.Errorf("%w: base %s is open with chunk size %d, asked for %d", ErrMismatch, baseID, e.base.chunk, chunk)
		}
	} else {
		e = &entry{ready: make(chan struct{}), refs: 1, bind: bind}
		m.open[baseID] = e
		m.mu.Unlock()
		e.base, e.err = m.openBase(baseID, bind, chunk, open)
		close(e.ready)
	}
	if e.err != nil {
		err := e.err
		m.mu.Lock()
		if e.refs--; e.refs == 0 && m.open[baseID] == e {
			delete(m.open, baseID)
		}
		m.mu.Unlock()
		return nil, err
	}
	return &Ref{Base: e.base, m: m, id: baseID}, nil
}

func (m *Manager) openBase(id string, bind Binding, chunk int64, open func() (blockdev.Device, error)) (*Base, error) {
	src, err := open()
	if err != nil {
		return nil, err
	}
	b, err := openBase(filepath.Join(m.dir, id), src, chunk, bind, m.newChunk.Load())
	if err != nil {
		src.Close()
		return nil, fmt.Errorf("base %s: %w", id, err)
	}
	b.onFill = m.filled
	m.approx.Add(b.Stats().BytesPresent)
	go m.Evict()
	return b, nil
}

func (m *Manager) release(id string) error {
	m.mu.Lock()
	e := m.open[id]
	if e == nil {
		m.mu.Unlock()
		return nil
	}
	e.refs--
	last := e.refs == 0
	var done chan struct{}
	if last {
		delete(m.open, id)
		if e.base != nil {
			done = make(chan struct{})
			m.closing[id] = done
		}
	}
	m.mu.Unlock()
	if done == nil {
		return nil
	}
	// A volume's cache is not kept past its last user (see Binding).
	err := e.base.close(!e.bind.IsTemplate())
	m.mu.Lock()
	delete(m.closing, id)
	m.mu.Unlock()
	close(done)
	m.Evict()
	return err
}

// Binding is what the base is open as.
func (r *Ref) Binding() Binding { return r.m.bindingOf(r.id) }

func (m *Manager) bindingOf(id string) Binding {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.open[id]; e != nil {
		return e.bind
	}
	return Binding{}
}

// Rebuilt says why an earlier cache of this base was emptied when it was
// opened ("" if it was reused or there was none), for the log.
func (r *Ref) Rebuilt() string { return r.rebuilt }

// DropStale removes, from the directory, the caches that may no longer be
// reused and that no process holds: volume caches (a volume's cache lives
// only while it has an export) and caches that record no identity. The
// daemon calls it at start, when none of its exports is open yet. It
// returns the ids removed.
func (m *Manager) DropStale() ([]string, error) {
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		return nil, fmt.Errorf("list cache directory: %w", err)
	}
	var dropped []string
	var errs []error
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, de := range ents {
		if !de.IsDir() || ValidID(de.Name()) != nil || m.open[de.Name()] != nil {
			continue
		}
		dir := filepath.Join(m.dir, de.Name())
		b, err := readIdentity(dir)
		if err == nil && b.IsTemplate() {
			continue
		}
		if _, berr := os.Stat(filepath.Join(dir, "bitmap")); errors.Is(err, os.ErrNotExist) && errors.Is(berr, os.ErrNotExist) {
			continue // nothing cached yet (e.g. only an imported trace): nothing stale to serve
		}
		if err := removeUnlocked(dir); err != nil {
			if !errors.Is(err, ErrInUse) {
				errs = append(errs, err)
			}
			continue
		}
		dropped = append(dropped, de.Name())
	}
	return dropped, errors.Join(errs...)
}

// filled accounts a fill; past the budget it starts an eviction pass, at
// most one a second (bases in use may keep the total above the budget).
func (m *Manager) filled(n int64) {
	if m.approx.Add(n) <= m.budget || m.budget <= 0 || m.evicting.Load() {
		return
	}
	now := time.Now().UnixNano()
	if last := m.lastEvict.Load(); now-last > int64(time.Second) && m.lastEvict.CompareAndSwap(last, now) {
		go m.Evict()
	}
}

// Info describes one base in the directory.
type Info struct {
	ID           string
	Size         int64
	ChunkSize    int64
	BytesOnDisk  int64
	Refs         int // open references (0: evictable)
	LastUsed     time.Time
	ChunksCached int64 // open bases only
}

// List describes every base in the directory.
func (m *Manager) List() ([]Info, error) {
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		return nil, fmt.Errorf("list cache directory: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Info
	for _, de := range ents {
		if !de.IsDir() || ValidID(de.Name()) != nil {
			continue
		}
		p := filepath.Join(m.dir, de.Name())
		inf := Info{ID: de.Name(), BytesOnDisk: diskUsage(p)}
		if h, err := pbitmap.ReadHeader(filepath.Join(p, "bitmap")); err == nil {
			inf.Size, inf.ChunkSize = h.Size, h.UnitSize
		}
		if st, err := os.Stat(filepath.Join(p, "bitmap")); err == nil {
			inf.LastUsed = st.ModTime()
		}
		if e := m.open[de.Name()]; e != nil {
			inf.Refs = e.refs
			inf.LastUsed = time.Now()
			select {
			case <-e.ready:
				if e.base != nil {
					inf.ChunksCached = e.base.bits.Count()
				}
			default: // still opening
			}
		}
		out = append(out, inf)
	}
	return out, nil
}

func diskUsage(dir string) int64 {
	var n int64
	for _, f := range []string{"data", "bitmap"} {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, f), &st) == nil {
			n += st.Blocks * 512
		}
	}
	return n
}

// Remove deletes a base's cache; ErrInUse if it is open here, an error if
// another process holds it.
func (m *Manager) Remove(baseID string) error {
	if err := ValidID(baseID); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.open[baseID] != nil {
		return fmt.Errorf("%w: %s", ErrInUse, baseID)
	}
	return removeUnlocked(filepath.Join(m.dir, baseID))
}

// removeUnlocked removes a base directory unless another process holds it.
func removeUnlocked(dir string) error {
	d, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Flock(int(d.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("%w: %s is held by another process", ErrInUse, dir)
	}
	return os.RemoveAll(dir)
}

// Evict removes unused bases, least recently used first, until the
// directory fits the budget. It runs by itself on open, release and fills
// past the budget; the daemon may call it too.
func (m *Manager) Evict() {
	if m.budget <= 0 || !m.evicting.CompareAndSwap(false, true) {
		return
	}
	defer m.evicting.Store(false)
	list, err := m.List()
	if err != nil {
		return
	}
	var total int64
	for _, inf := range list {
		total += inf.BytesOnDisk
	}
	m.approx.Store(total)
	sort.Slice(list, func(i, j int) bool { return list[i].LastUsed.Before(list[j].LastUsed) })
	for _, inf := range list {
		if total <= m.budget {
			break
		}
		if inf.BytesOnDisk == 0 {
			// Nothing cached (a trace imported before the base's first
			// export waits here): removing it frees nothing.
			continue
		}
		m.mu.Lock()
		if m.open[inf.ID] == nil && removeUnlocked(filepath.Join(m.dir, inf.ID)) == nil {
			total -= inf.BytesOnDisk
		}
		m.mu.Unlock()
	}
	m.approx.Store(total)
}
