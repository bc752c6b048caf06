// Package prefetch records the order in which a boot first reads a
// template base's chunks (a trace, stored beside the base's cache) and
// replays it ahead of the guest on the next cold boot of the base.
//
// Only template bases have traces: a volume's cache is dropped when its
// last export goes, so its trace would never be replayed. The trace lives
// in the base's cache directory (cache.TraceFile) and goes with the
// content it was recorded for: the cache drops it whenever it empties
// itself for other content.
//
// Record: the first export of a base without a trace watches the guest's
// reads at the base (a thin layer over the cache reference, Attach) and
// notes each chunk the first time it is read, with the milliseconds since
// the first read, until Config.RecordWindow has passed, StopRecording is
// called, or the base's last export closes; then the trace is written
// atomically.
//
// Replay: when an export of a base with a trace opens, Config.Concurrency
// workers walk the trace through the cache's normal fill path
// (Base.Prefetch: per-chunk locks, one fetch per chunk), skipping chunks
// already present, at most Config.Lookahead chunks of the trace ahead of
// the furthest trace chunk the guest has read, and jumping forward when
// the guest reads past them. The guest never waits behind a queue of
// prefetches: at most Concurrency fills are in flight, and a guest miss
// goes to the source directly. When the guest's first reads leave the
// trace (another workload, another version) the replay backs off and
// stops. It stops when the trace is done or the base's last export
// closes.
package prefetch

import (
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// Config tunes record and replay.
type Config struct {
	// RecordWindow is how long after a boot's first read its reads are
	// recorded. 0: DefaultRecordWindow.
	RecordWindow time.Duration
	// Lookahead is how many trace entries the replay may run ahead of the
	// furthest one the guest has read. 0: DefaultLookahead.
	Lookahead int
	// Concurrency is the number of fills the replay has in flight. 0:
	// DefaultConcurrency.
	Concurrency int
	// Disabled: no recording and no replay (Attach returns the reference).
	Disabled bool
	Log      logrus.FieldLogger
	// Fetch, when set, is asked for a trace when a base without one opens
	// (the daemon asks its peers): it returns the trace and where it came
	// from, or nil to record one here. A fetched trace that does not fit
	// the base is dropped. A trace only orders prefetches (every byte is
	// still verified below), so a bad one can at worst waste bandwidth,
	// within the lookahead, and the replay backs off when the guest leaves
	// it.
	Fetch func(id string, size, chunkSize int64) (t *Trace, from string)
}

// Defaults.
const (
	DefaultRecordWindow = 60 * time.Second
	DefaultLookahead    = 512
	DefaultConcurrency  = 2
	// backoffWindow first reads of the guest are looked at together: when
	// fewer than a quarter of them are in the trace, the replay stops.
	backoffWindow = 32
)

// ErrNoRecording is returned by StopRecording when the base records nothing.
var ErrNoRecording = errors.New("no trace is being recorded for this base")

// Stats are one base's prefetch counters since the manager started.
type Stats struct {
	Recording       bool   // a trace is being recorded
	Replaying       bool   // the replay runs
	BackedOff       bool   // the last replay stopped because the guest left the trace
	Prefetched      uint64 // chunks fetched by the replay
	PrefetchedBytes uint64
	Hits            uint64 // prefetched chunks the guest then read
	HitBytes        uint64
	Skipped         uint64 // trace chunks already present
	WastedBytes     uint64 // prefetched bytes no guest read before the replay's base closed
	// FetchedFrom is where the last trace fetched for the base (Config.Fetch)
	// came from, and FetchedSum the CRC-32 of its file: a caller tells
	// whether the stored trace is still that one.
	FetchedFrom string
	FetchedSum  uint32
}

type fetched struct {
	from string
	sum  uint32
}

type counters struct {
	prefetched, prefetchedBytes, hits, hitBytes, skipped, wasted atomic.Uint64
	backedOff                                                    atomic.Bool
	fetched                                                      atomic.Pointer[fetched]
}

// Manager keeps the record and replay state of every open base. One per
// daemon; Attach is called by package stack for each export of a template.
type Manager struct {
	cfg   Config
	log   logrus.FieldLogger
	mu    sync.Mutex
	bases map[string]*baseState
	stats map[string]*counters
}

// NewManager makes a manager.
func NewManager(cfg Config) *Manager {
	if cfg.RecordWindow <= 0 {
		cfg.RecordWindow = DefaultRecordWindow
	}
	if cfg.Lookahead <= 0 {
		cfg.Lookahead = DefaultLookahead
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = DefaultConcurrency
	}
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	return &Manager{cfg: cfg, log: log, bases: map[string]*baseState{}, stats: map[string]*counters{}}
}

// Config is the manager's configuration, defaults applied.
func (m *Manager) Config() Config { return m.cfg }

// baseState is one open base's recorder or replayer, shared by its exports.
type baseState struct {
	m     *Manager
	id    string
	base  *cache.Base
	chunk int64
	ctr   *counters
	refs  int

	mu     sync.Mutex
	seen   []atomic.Uint64 // chunks the guest has read; set under mu, read without it
	active atomic.Bool
	rec    *recorder
	rep    *replayer
}

// Attach returns the device an export of template base id stacks on
// instead of ref: it passes every call to ref and watches the guest's
// reads, recording a trace when the base has none and replaying it when
// it has. Closing it closes ref.
func (m *Manager) Attach(id string, ref *cache.Ref) blockdev.Device {
	if m == nil || m.cfg.Disabled {
		return ref
	}
	m.mu.Lock()
	open := m.bases[id] != nil
	m.mu.Unlock()
	if !open && m.cfg.Fetch != nil {
		m.fetch(id, ref.Base) // not under m.mu: it may take a round trip
	}
	m.mu.Lock()
	st := m.bases[id]
	if st == nil {
		st = m.open(id, ref.Base)
		m.bases[id] = st
	}
	st.refs++
	m.mu.Unlock()
	t := &tap{Forward: blockdev.Forward{Next: ref}, st: st}
	if a := blockdev.AsyncOf(ref); a != nil {
		return &asyncTap{tap: t, src: a}
	}
	return t
}

// fetch asks Config.Fetch for a trace of base b when it has none, and
// stores one that fits it.
func (m *Manager) fetch(id string, b *cache.Base) {
	if _, err := os.Stat(Path(b.Dir())); !errors.Is(err, os.ErrNotExist) {
		return
	}
	t, from := m.cfg.Fetch(id, b.Size(), b.ChunkSize())
	if t == nil {
		return
	}
	log := m.log.WithFields(logrus.Fields{"base": id, "from": from})
	if err := t.Fits(b.Size()); err != nil {
		log.WithError(err).Warn("fetched boot trace does not fit the base: dropped")
		return
	}
	raw, err := t.Encode()
	if err != nil {
		log.WithError(err).Warn("fetched boot trace is not valid: dropped")
		return
	}
	if _, err := os.Stat(Path(b.Dir())); !errors.Is(err, os.ErrNotExist) {
		return // one was stored meanwhile
	}
	if err := Save(b.Dir(), t); err != nil {
		log.WithError(err).Warn("could not store the fetched boot trace")
		return
	}
	m.mu.Lock()
	m.counters(id).fetched.Store(&fetched{from: from, sum: Sum(raw)})
	m.mu.Unlock()
	log.WithField("chunks", len(t.Chunks)).Info("boot trace fetched")
}

func (m *Manager) counters(id string) *counters {
	c := m.stats[id]
	if c == nil {
		c = &counters{}
		m.stats[id] = c
	}
	return c
}

// open starts recording or replaying base id; m.mu held.
func (m *Manager) open(id string, b *cache.Base) *baseState {
	st := &baseState{m: m, id: id, base: b, chunk: b.ChunkSize(), ctr: m.counters(id)}
	n := (b.Size() + st.chunk - 1) / st.chunk
	st.seen = make([]atomic.Uint64, (n+63)/64)
	log := m.log.WithField("base", id)
	t, err := Load(b.Dir())
	switch {
	case errors.Is(err, os.ErrNotExist):
		st.rec = &recorder{}
		log.Info("recording a boot trace")
	case err != nil:
		log.WithError(err).Warn("unreadable boot trace: recording a new one")
		st.rec = &recorder{}
	case t.Fits(b.Size()) != nil:
		log.WithError(t.Fits(b.Size())).Warn("boot trace does not fit the base: recording a new one")
		st.rec = &recorder{}
	default:
		st.rep = st.startReplay(t)
	}
	st.active.Store(true)
	return st
}

func (st *baseState) seenGet(c int64) bool { return st.seen[c>>6].Load()&(1<<(c&63)) != 0 }

// allSeen reports, without the lock, whether the guest has read every
// chunk of first..last before: after a boot nearly every read is such a
// read, and it must not take the base's lock that every export shares.
func (st *baseState) allSeen(first, last int64) bool {
	for c := first; c <= last && c>>6 < int64(len(st.seen)); c++ {
		if !st.seenGet(c) {
			return false
		}
	}
	return true
}

// observe notes a guest read of [off, off+n): new first reads go to the
// recorder and the replayer. It reports whether a chunk was missing.
func (st *baseState) observe(off, n int64) {
	if n <= 0 || !st.active.Load() {
		return
	}
	first, last := off/st.chunk, (off+n-1)/st.chunk
	if st.allSeen(first, last) {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	for c := first; c <= last && c>>6 < int64(len(st.seen)); c++ {
		if st.seenGet(c) {
			continue
		}
		st.seen[c>>6].Or(1 << (c & 63))
		if st.rec != nil {
			st.rec.add(st, c)
		}
		if st.rep != nil {
			st.rep.guestRead(st, c)
		}
	}
}

// release drops one export's hold; the last stops the replay and saves
// what was recorded.
func (m *Manager) release(st *baseState) {
	m.mu.Lock()
	st.refs--
	if st.refs > 0 {
		m.mu.Unlock()
		return
	}
	delete(m.bases, st.id)
	m.mu.Unlock()
	st.active.Store(false)
	st.mu.Lock()
	rep := st.rep
	st.mu.Unlock()
	if rep != nil {
		rep.stop(st)
	}
	st.finishRecording("the base's last export closed")
}

// StopRecording ends the recording of base id now and saves the trace.
func (m *Manager) StopRecording(id string) error {
	m.mu.Lock()
	st := m.bases[id]
	m.mu.Unlock()
	if st == nil {
		return ErrNoRecording
	}
	st.mu.Lock()
	rec := st.rec != nil && !st.rec.done
	st.mu.Unlock()
	if !rec {
		return ErrNoRecording
	}
	return st.finishRecording("stopped by request")
}

// Stats are base id's counters (zero for a base never attached).
func (m *Manager) Stats(id string) Stats {
	m.mu.Lock()
	c, st := m.stats[id], m.bases[id]
	m.mu.Unlock()
	var s Stats
	if c == nil {
		return s
	}
	if st != nil {
		st.mu.Lock()
		s.Recording = st.rec != nil && !st.rec.done
		s.Replaying = st.rep != nil && !st.rep.finished
		st.mu.Unlock()
	}
	s.BackedOff = c.backedOff.Load()
	s.Prefetched, s.PrefetchedBytes = c.prefetched.Load(), c.prefetchedBytes.Load()
	s.Hits, s.HitBytes = c.hits.Load(), c.hitBytes.Load()
	s.Skipped, s.WastedBytes = c.skipped.Load(), c.wasted.Load()
	if f := c.fetched.Load(); f != nil {
		s.FetchedFrom, s.FetchedSum = f.from, f.sum
	}
	return s
}

// All is every base's counters.
func (m *Manager) All() map[string]Stats {
	m.mu.Lock()
	ids := make([]string, 0, len(m.stats))
	for id := range m.stats {
		ids = append(ids, id)
	}
	m.mu.Unlock()
	out := make(map[string]Stats, len(ids))
	for _, id := range ids {
		out[id] = m.Stats(id)
	}
	return out
}

// Forget drops base id's counters (its cache was removed).
func (m *Manager) Forget(id string) {
	m.mu.Lock()
	if m.bases[id] == nil {
		delete(m.stats, id)
	}
	m.mu.Unlock()
}

// recorder collects first reads until the window closes.
type recorder struct {
	start  time.Time
	chunks []int64
	ms     []uint32
	timer  *time.Timer
	done   bool
}

// add notes chunk c's first read; st.mu held.
func (r *recorder) add(st *baseState, c int64) {
	if r.done || len(r.chunks) >= MaxEntries {
		return
	}
	now := time.Now()
	if r.chunks == nil {
		r.start = now
		r.timer = time.AfterFunc(st.m.cfg.RecordWindow, func() { st.finishRecording("the record window passed") })
	}
	r.chunks = append(r.chunks, c)
	r.ms = append(r.ms, uint32(now.Sub(r.start).Milliseconds()))
}

// finishRecording saves the trace recorded so far, once.
func (st *baseState) finishRecording(why string) error {
	st.mu.Lock()
	r := st.rec
	if r == nil || r.done {
		st.mu.Unlock()
		return nil
	}
	r.done = true
	if r.timer != nil {
		r.timer.Stop()
	}
	t := &Trace{ChunkSize: st.chunk, Size: st.base.Size(), Chunks: r.chunks, MS: r.ms}
	st.mu.Unlock()
	log := st.m.log.WithField("base", st.id)
	if len(t.Chunks) == 0 {
		log.Info("no reads to record a boot trace of")
		return nil
	}
	if err := Save(st.base.Dir(), t); err != nil {
		log.WithError(err).Error("could not save the boot trace")
		return err
	}
	log.WithFields(logrus.Fields{"chunks": len(t.Chunks), "ms": t.Duration(), "why": why}).Info("boot trace recorded")
	return nil
}

// tap is the layer Attach returns: it tells the base state about each
// guest read, then reads through the reference.
type tap struct {
	blockdev.Forward
	st   *baseState
	once sync.Once
}

func (t *tap) ReadAt(p []byte, off int64) (int, error) {
	t.st.observe(off, int64(len(p)))
	return t.Next.ReadAt(p, off)
}

func (t *tap) Prefetch(off, length int64) error {
	t.st.observe(off, length)
	return t.Next.Prefetch(off, length)
}

func (t *tap) Close() error {
	t.once.Do(func() { t.st.m.release(t.st) })
	return t.Next.Close()
}

// asyncTap is a tap over a reference with an asynchronous read path.
type asyncTap struct {
	*tap
	src blockdev.AsyncReader
}

func (a *asyncTap) ReadAtAsync(p []byte, off int64, done func(error)) {
	a.st.observe(off, int64(len(p)))
	a.src.ReadAtAsync(p, off, done)
}

func (a *asyncTap) Unplug() { a.src.Unplug() }
