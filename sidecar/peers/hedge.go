package peers

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// A HedgingFetcher can send a request as a hedge (Client does): on a
// spare connection, or cached-only. A Source whose fetcher is not one
// waits for each candidate in turn.
type HedgingFetcher interface {
	Fetcher
	FetchWith(ctx context.Context, peer Peer, req Request, p []byte, mode FetchMode) error
}

// Hedging: a chunk request that has not been answered after the hedge
// delay (about the 95th percentile of the recent successful fetches) is
// asked again, cached-only, of the same home on the spare connection — a
// stalled TCP connection then costs one delay, not the client's timeout —
// then of the next candidate, and so on in turn, each hedge waiting twice
// as long as the one before (maxSpareHedges, maxCachedHedges). A cached-only request
// is answered only by a member that holds the chunk, so a hedge never
// makes a member read its origin, and a home busy filling the chunk is
// not sent it twice. The first verified answer wins. The others are not
// cancelled but finish in the background (bounded by the client's
// timeout) and are counted, so that what members served and what this
// node received still agree. The origin is read only when every
// candidate failed or timed out.
const (
	hedgeFloor      = 10 * time.Millisecond  // below this a hedge is mostly waste
	hedgeCap        = 500 * time.Millisecond // a slow cluster still hedges well before the timeout
	hedgeFirst      = 200 * time.Millisecond // until enough fetches were timed
	latencySamples  = 128
	latencyMinCount = 16
	maxCachedHedges = 2
	// maxSpareHedges per candidate asked to fill: a second spare hedge
	// catches a connection that stalls after the chunk was filled (the
	// first was answered "not held" while the home was filling it).
	maxSpareHedges = 2
	// downAfter consecutive failures (no answer, or an error answer) put a
	// member in cooldown: one timeout on a busy node is not a dead node.
	downAfter = 2
)

// latencyWindow keeps the last successful fetch times of a source.
type latencyWindow struct {
	mu      sync.Mutex
	ring    [latencySamples]time.Duration
	n, next int
	delay   time.Duration // hedge delay, recomputed every few observations
	since   int
}

func (w *latencyWindow) observe(d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ring[w.next] = d
	w.next = (w.next + 1) % latencySamples
	w.n = min(w.n+1, latencySamples)
	if w.since++; w.since >= latencyMinCount/2 || w.delay == 0 {
		w.since = 0
		if w.n >= latencyMinCount {
			s := slices.Clone(w.ring[:w.n])
			slices.Sort(s)
			w.delay = min(max(s[len(s)*95/100], hedgeFloor), hedgeCap)
		}
	}
}

// hedgeDelay is how long a request waits before it is hedged.
func (w *latencyWindow) hedgeDelay() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.delay == 0 {
		return hedgeFirst
	}
	return w.delay
}

// attempt is one chunk request of fromPeers.
type attempt struct {
	peer  Peer
	mode  FetchMode
	hedge bool
	buf   *[]byte
	err   error
	took  time.Duration
}

// fromPeers asks the candidates for chunk c, best first, hedging slow
// requests; it reports whether q holds the chunk, verified.
func (s *Source) fromPeers(c int64, q []byte) bool {
	cands := s.candidates(c)
	if len(cands) == 0 {
		return false
	}
	hf, hedging := s.o.Fetcher.(HedgingFetcher)
	req := Request{Base: s.o.Key, ChunkSize: s.o.Manifest.ChunkSize, Index: c}
	ctx := context.Background()
	// Room for every attempt that can be launched, so that none blocks
	// once this returns.
	done := make(chan *attempt, s.o.MaxAttempts*(1+maxSpareHedges)+maxCachedHedges)
	launch := func(peer Peer, mode FetchMode, hedge bool) {
		a := &attempt{peer: peer, mode: mode, hedge: hedge, buf: s.buf(req.ChunkSize)}
		if hedge {
			s.stats.Hedges.Add(1)
		}
		go func() {
			t0 := time.Now()
			p := (*a.buf)[:len(q)]
			if mode == (FetchMode{}) {
				a.err = s.o.Fetcher.Fetch(ctx, peer, req, p)
			} else {
				a.err = hf.FetchWith(ctx, peer, req, p, mode)
			}
			a.took = time.Since(t0)
			done <- a
		}()
	}

	full, fulls := 0, 1              // the candidate asked to fill (cands[full]), full requests sent
	spares, sparePending := 0, false // spare hedges of cands[full]
	ticks := 0
	next := 1 // the next candidate to ask cached-only
	cachedSent := 0
	filling, pending := 1, 1 // requests in flight that may fill, and all
	launch(cands[0], FetchMode{}, false)

	var tick <-chan time.Time
	var timer *time.Timer
	// Each hedge waits twice as long as the one before: a home that is
	// slow because it is filling the chunk gets a few hedges, not many.
	base := s.lat.hedgeDelay()
	delay := base
	if hedging {
		timer = time.NewTimer(delay)
		defer timer.Stop()
		tick = timer.C
	}
	for pending > 0 {
		select {
		case <-tick:
			ticks++
			canSpare := !sparePending && spares < maxSpareHedges
			canCached := next < len(cands) && cachedSent < maxCachedHedges
			switch {
			case canSpare && (ticks%2 == 1 || !canCached): // home and others in turn
				spares++
				sparePending = true
				pending++
				launch(cands[full], FetchMode{Spare: true, CachedOnly: true}, true)
			case canCached:
				cachedSent++
				pending++
				launch(cands[next], FetchMode{CachedOnly: true}, true)
				next++
			default:
				continue
			}
			delay *= 2
			timer.Reset(delay)
		case a := <-done:
			pending--
			if !a.mode.CachedOnly {
				filling--
			}
			if a.mode.Spare {
				sparePending = false
			}
			ok := s.settle(c, a, len(q), true)
			if ok {
				copy(q, (*a.buf)[:len(q)])
			}
			s.putBuf(req.ChunkSize, a.buf)
			if ok {
				go s.settleLate(c, done, pending, len(q), req.ChunkSize)
				return true
			}
			// The candidate filling has failed: the next one fills, as
			// when there is no hedging.
			if filling == 0 && fulls < s.o.MaxAttempts && full+1 < len(cands) {
				full++
				fulls++
				next = max(next, full+1)
				spares, sparePending = 0, false
				filling++
				pending++
				launch(cands[full], FetchMode{}, false)
				if timer != nil {
					delay = base
					timer.Reset(delay)
				}
			}
		}
	}
	return false
}

// settleLate counts the n attempts still in flight when chunk c was
// answered: their bytes were sent all the same.
func (s *Source) settleLate(c int64, done <-chan *attempt, n, size int, chunkSize int64) {
	for range n {
		a := <-done
		if s.settle(c, a, size, false) {
			s.stats.HedgeWasteBytes.Add(uint64(size))
		}
		s.putBuf(chunkSize, a.buf)
	}
}

// settle counts the outcome of attempt a at chunk c, a chunk of size
// bytes, and reports whether it is a verified answer. used is false for
// an attempt that ended after the chunk was had: only its bytes, and bad
// bytes, are counted (it held no read; its member was slow, not dead).
func (s *Source) settle(c int64, a *attempt, size int, used bool) bool {
	name := a.peer.Name
	if a.err != nil {
		var fe *FetchError
		isFE := errors.As(a.err, &fe)
		switch {
		case !used:
		case a.mode.CachedOnly && isFE && fe.Status == http.StatusNotFound:
			s.stats.NotHeld.Add(1)
		default:
			s.o.Traffic.observe(fetchOutcome(a.err), a.took)
			s.stats.PeerErrors.Add(1)
			if !isFE || fe.Unavailable {
				s.failed(name)
			}
		}
		return false
	}
	p := (*a.buf)[:size]
	if !s.o.Manifest.Verify(c, p) {
		s.o.Traffic.observe(OutcomeCorrupt, a.took)
		s.stats.CorruptChunks.Add(1)
		s.markDown(name)
		return false
	}
	s.o.Traffic.received(name, size)
	s.stats.BytesFromPeers.Add(uint64(size))
	s.lat.observe(a.took)
	if !used {
		return true
	}
	s.answered(name)
	s.o.Traffic.observe(OutcomeOK, a.took)
	s.stats.PeerFetchNanos.Add(uint64(a.took))
	s.stats.PeerFetches.Add(1)
	s.stats.ChunksFromPeers.Add(1)
	if a.hedge {
		s.stats.HedgeWins.Add(1)
	}
	return true
}

// candidates are the members to ask for chunk c: those serving the base
// that outweigh this node for it, best first, without those cooling down.
func (s *Source) candidates(c int64) []Peer {
	self := s.o.Members.Self()
	serving := s.o.Members.Serving(s.o.Key.ID)
	if len(serving) == 0 {
		return nil
	}
	addr := make(map[string]string, len(serving)+1)
	names := make([]string, 0, len(serving)+1)
	for _, p := range serving {
		if _, dup := addr[p.Name]; !dup {
			addr[p.Name] = p.Addr
			names = append(names, p.Name)
		}
	}
	if _, ok := addr[self]; !ok {
		names = append(names, self) // this node's weight bounds whom it asks
	}
	var out []Peer
	now := time.Now()
	for _, name := range Rank(names, s.o.Key.ID, c) {
		if name == self || len(out) >= s.o.MaxAttempts+maxCachedHedges {
			break
		}
		if until, ok := s.down.Load(name); ok && now.Before(until.(time.Time)) {
			s.stats.PeerSkipped.Add(1)
			continue
		}
		out = append(out, Peer{Name: name, Addr: addr[name]})
	}
	return out
}

// failed counts a failure of member name; downAfter in a row put it in
// cooldown.
func (s *Source) failed(name string) {
	v, _ := s.fails.LoadOrStore(name, new(atomic.Int32))
	if v.(*atomic.Int32).Add(1) >= downAfter {
		v.(*atomic.Int32).Store(0)
		s.markDown(name)
	}
}

// answered clears member name's failures.
func (s *Source) answered(name string) {
	if v, ok := s.fails.Load(name); ok {
		v.(*atomic.Int32).Store(0)
	}
}

func (s *Source) markDown(name string) { s.down.Store(name, time.Now().Add(s.o.Cooldown)) }

func (s *Source) buf(size int64) *[]byte {
	if b, ok := s.bufs.Get().(*[]byte); ok && int64(cap(*b)) >= size {
		return b
	}
	b := make([]byte, size)
	return &b
}

func (s *Source) putBuf(size int64, b *[]byte) { s.bufs.Put(b) }
