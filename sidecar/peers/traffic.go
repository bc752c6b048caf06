package peers

import (
	"context"
	"errors"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Fetch outcomes, the label of a peer fetch's latency.
const (
	OutcomeOK      = "ok"      // a chunk that passed verification
	OutcomeTimeout = "timeout" // no answer within the client's timeout
	OutcomeError   = "error"   // refused, unreachable, an error answer
	OutcomeCorrupt = "corrupt" // an answer that failed verification
)

// Outcomes lists every fetch outcome, in a fixed order.
var Outcomes = []string{OutcomeOK, OutcomeTimeout, OutcomeError, OutcomeCorrupt}

// FetchBuckets are the upper bounds (seconds) of the fetch latency
// histogram: a chunk over loopback or a LAN takes a few hundred
// microseconds, a timeout up to the client's 2 s.
var FetchBuckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// Histogram is a fixed-bucket latency histogram, safe for concurrent use
// (the daemon turns it into a Prometheus one; this package does not
// depend on Prometheus).
type Histogram struct {
	counts [len(FetchBuckets) + 1]atomic.Uint64 // one per bound, then +Inf
	nanos  atomic.Uint64
}

// Observe records one fetch that took d.
func (h *Histogram) Observe(d time.Duration) {
	s := d.Seconds()
	i := sort.SearchFloat64s(FetchBuckets[:], s) // first bound >= s
	h.counts[i].Add(1)
	h.nanos.Add(uint64(max(d, 0)))
}

// HistogramSnapshot is a histogram read at one time: Buckets maps each
// upper bound to the number of observations at or below it (cumulative,
// as Prometheus wants).
type HistogramSnapshot struct {
	Count   uint64
	Sum     float64 // seconds
	Buckets map[float64]uint64
}

// Snapshot reads h.
func (h *Histogram) Snapshot() HistogramSnapshot {
	s := HistogramSnapshot{Buckets: make(map[float64]uint64, len(FetchBuckets))}
	for i, b := range FetchBuckets {
		s.Count += h.counts[i].Load()
		s.Buckets[b] = s.Count
	}
	s.Count += h.counts[len(FetchBuckets)].Load()
	s.Sum = time.Duration(h.nanos.Load()).Seconds()
	return s
}

// MemberBytes is what this node exchanged with one member.
type MemberBytes struct {
	// Received: chunk bytes read from the member that passed
	// verification. Served: chunk bytes this node sent it.
	Received, Served uint64
}

type memberCounters struct{ received, served atomic.Uint64 }

// Traffic counts, for one node, the chunk bytes exchanged with each member
// and the latency of chunk fetches by outcome. Its names are those of
// members that asked or were asked (certificate names of the cluster CA);
// Retain drops the ones membership no longer knows, so it stays as small
// as the cluster.
type Traffic struct {
	mu      sync.Mutex
	members map[string]*memberCounters
	fetch   [4]Histogram // by outcome, in Outcomes order
}

// NewTraffic makes empty counters.
func NewTraffic() *Traffic { return &Traffic{members: map[string]*memberCounters{}} }

func (t *Traffic) of(name string) *memberCounters {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.members[name]
	if c == nil {
		c = &memberCounters{}
		t.members[name] = c
	}
	return c
}

// received counts n verified bytes from member name (nil t: nothing).
func (t *Traffic) received(name string, n int) {
	if t != nil {
		t.of(name).received.Add(uint64(n))
	}
}

// served counts n bytes sent to member name.
func (t *Traffic) served(name string, n int) {
	if t != nil {
		t.of(name).served.Add(uint64(n))
	}
}

// observe records a fetch of the given outcome that took d.
func (t *Traffic) observe(outcome string, d time.Duration) {
	if t == nil {
		return
	}
	for i, o := range Outcomes {
		if o == outcome {
			t.fetch[i].Observe(d)
			return
		}
	}
}

// Members reads the per-member counters.
func (t *Traffic) Members() map[string]MemberBytes {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]MemberBytes, len(t.members))
	for name, c := range t.members {
		out[name] = MemberBytes{Received: c.received.Load(), Served: c.served.Load()}
	}
	return out
}

// Fetches reads the fetch latency histogram of each outcome.
func (t *Traffic) Fetches() map[string]HistogramSnapshot {
	out := make(map[string]HistogramSnapshot, len(Outcomes))
	for i, o := range Outcomes {
		out[o] = t.fetch[i].Snapshot()
	}
	return out
}

// Retain drops the counters of every member for which keep is false (one
// that membership has forgotten): a member that comes back later starts
// from zero, which Prometheus reads as a counter reset.
func (t *Traffic) Retain(keep func(name string) bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for name := range t.members {
		if !keep(name) {
			delete(t.members, name)
		}
	}
}

// fetchOutcome classifies a failed fetch: timeout when no answer came in
// time, error otherwise.
func fetchOutcome(err error) string {
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return OutcomeTimeout
	}
	return OutcomeError
}
