package prefetch

import (
	"context"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// replayer walks a trace ahead of the guest. Its fields are guarded by the
// base state's mutex; cond wakes the workers.
type replayer struct {
	order    []int64       // cache chunks in trace order
	index    map[int64]int // chunk -> position in order
	next     int           // the next position a worker takes
	guest    int           // one past the furthest position the guest read
	fetched  map[int64]bool
	recent   []bool // the guest's last first reads: in the trace or not
	stopped  bool
	finished bool
	cond     *sync.Cond
	wg       sync.WaitGroup
}

// startReplay starts the workers; st.mu need not be held (st is new).
func (st *baseState) startReplay(t *Trace) *replayer {
	order, _ := t.Rechunk(st.chunk)
	r := &replayer{order: order, index: make(map[int64]int, len(order)), fetched: map[int64]bool{},
		cond: sync.NewCond(&st.mu)}
	for i, c := range order {
		r.index[c] = i
	}
	st.ctr.backedOff.Store(false)
	st.m.log.WithFields(logrus.Fields{"base": st.id, "chunks": len(order)}).Info("replaying the boot trace")
	n := st.m.cfg.Concurrency
	r.wg.Add(n)
	for i := 0; i < n; i++ {
		go func() {
			defer r.wg.Done()
			r.work(st)
		}()
	}
	go func() {
		r.wg.Wait()
		st.mu.Lock()
		r.finished = true
		st.mu.Unlock()
	}()
	return r
}

// work takes trace positions in order and fills their chunks.
func (r *replayer) work(st *baseState) {
	la := st.m.cfg.Lookahead
	st.mu.Lock()
	defer st.mu.Unlock()
	for {
		for !r.stopped && r.next < len(r.order) && r.next >= r.guest+la {
			r.cond.Wait()
		}
		if r.stopped || r.next >= len(r.order) {
			return
		}
		c := r.order[r.next]
		r.next++
		if st.seenGet(c) { // the guest has read it: present or being filled
			continue
		}
		if st.base.Present(c) {
			st.ctr.skipped.Add(1)
			continue
		}
		st.mu.Unlock()
		off := c * st.chunk
		n := min(st.chunk, st.base.Size()-off)
		err := st.base.Prefetch(off, n)
		st.mu.Lock()
		if err != nil {
			st.m.log.WithError(err).WithField("base", st.id).Warn("boot trace replay stopped")
			r.stopped = true
			r.cond.Broadcast()
			return
		}
		if !st.base.Present(c) {
			continue
		}
		st.ctr.prefetched.Add(1)
		st.ctr.prefetchedBytes.Add(uint64(n))
		if st.seenGet(c) {
			// The guest asked for it while it was on its way.
			st.ctr.hits.Add(1)
			st.ctr.hitBytes.Add(uint64(n))
		} else {
			r.fetched[c] = true
		}
	}
}

// guestRead notes the guest's first read of chunk c; st.mu held.
func (r *replayer) guestRead(st *baseState, c int64) {
	if r.fetched[c] {
		delete(r.fetched, c)
		n := uint64(min(st.chunk, st.base.Size()-c*st.chunk))
		st.ctr.hits.Add(1)
		st.ctr.hitBytes.Add(n)
	}
	if r.stopped {
		return
	}
	i, in := r.index[c]
	if in && i >= r.guest {
		r.guest = i + 1
		// The guest is past the workers: what lies between is no longer
		// ahead of it (it read those or will fetch them itself).
		r.next = max(r.next, i+1)
		r.cond.Broadcast()
	}
	if len(r.recent) == backoffWindow {
		copy(r.recent, r.recent[1:])
		r.recent = r.recent[:backoffWindow-1]
	}
	r.recent = append(r.recent, in)
	if len(r.recent) == backoffWindow {
		on := 0
		for _, b := range r.recent {
			if b {
				on++
			}
		}
		if on*4 < backoffWindow {
			st.m.log.WithFields(logrus.Fields{"base": st.id, "in_trace": on, "of": backoffWindow}).
				Warn("the guest's reads left the boot trace: replay backs off")
			st.ctr.backedOff.Store(true)
			r.stopped = true
			r.cond.Broadcast()
		}
	}
}

// stop ends the replay and waits for its fills; what it fetched that no
// guest read is wasted.
func (r *replayer) stop(st *baseState) {
	st.mu.Lock()
	r.stopped = true
	r.cond.Broadcast()
	st.mu.Unlock()
	r.wg.Wait()
	st.mu.Lock()
	for c := range r.fetched {
		st.ctr.wasted.Add(uint64(min(st.chunk, st.base.Size()-c*st.chunk)))
	}
	r.fetched = map[int64]bool{}
	st.mu.Unlock()
}

// WarmTrace fills the chunks of base b's trace (a warm-up of just the
// boot's working set), four at a time, in trace order. progress (may be
// nil) gets bytes done and the trace's total, from one goroutine at a time.
func WarmTrace(ctx context.Context, b *cache.Base, progress func(done, total int64)) error {
	t, err := Load(b.Dir())
	if err != nil {
		return err
	}
	if err := t.Fits(b.Size()); err != nil {
		return err
	}
	order, _ := t.Rechunk(b.ChunkSize())
	span := func(c int64) int64 { return min(b.ChunkSize(), b.Size()-c*b.ChunkSize()) }
	var total int64
	for _, c := range order {
		total += span(c)
	}
	var mu sync.Mutex
	var done int64
	var firstErr error
	next := 0
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if next >= len(order) || firstErr != nil || ctx.Err() != nil {
					mu.Unlock()
					return
				}
				c := order[next]
				next++
				mu.Unlock()
				err := b.Prefetch(c*b.ChunkSize(), span(c))
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				done += span(c)
				if progress != nil {
					progress(done, total)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.Sync()
}
