package peers

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// hedgeFetcher is a HedgingFetcher whose answers a test scripts per peer
// and mode; it records every request.
type hedgeFetcher struct {
	answer func(ctx context.Context, p Peer, mode FetchMode, q []byte) error
	mu     sync.Mutex
	asked  []string // "peer mode"
}

func (f *hedgeFetcher) Fetch(ctx context.Context, p Peer, r Request, q []byte) error {
	return f.FetchWith(ctx, p, r, q, FetchMode{})
}

func (f *hedgeFetcher) FetchWith(ctx context.Context, p Peer, r Request, q []byte, mode FetchMode) error {
	what := p.Name
	if mode.Spare {
		what += " spare"
	}
	if mode.CachedOnly {
		what += " cached"
	}
	f.mu.Lock()
	f.asked = append(f.asked, what)
	f.mu.Unlock()
	return f.answer(ctx, p, mode, q)
}

func (f *hedgeFetcher) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.asked...)
}

// hedgeSetup is a source of node "me" among three peers, and a chunk for
// which all three outweigh it: home first.
type hedgeSetup struct {
	data   []byte
	m      *Manifest
	origin *countingDev
	src    *Source
	chunk  int64
	ranked []string
}

const hedgeChunk = 4096

func newHedgeSetup(t *testing.T, f Fetcher) *hedgeSetup {
	t.Helper()
	h := &hedgeSetup{data: randomBytes(21, 64*hedgeChunk)}
	h.m = manifestOf(t, h.data, hedgeChunk)
	h.origin = newCounting(h.data, hedgeChunk)
	names := []string{"p1", "p2", "p3", "me"}
	h.chunk = -1
	for c := range int64(64) {
		if r := Rank(names, testKey.ID, c); r[3] == "me" {
			h.chunk, h.ranked = c, r[:3]
			break
		}
	}
	if h.chunk < 0 {
		t.Fatal("no chunk where me weighs least")
	}
	var err error
	h.src, err = NewSource(h.origin, SourceOptions{Key: testKey, Manifest: h.m, Fetcher: f,
		Members: StaticMembers{Me: "me", Peers: []Peer{{"p1", "a1"}, {"p2", "a2"}, {"p3", "a3"}}}})
	if err != nil {
		t.Fatal(err)
	}
	// Successful fetches of 20 ms: the hedge delay is 20 ms.
	for range latencyMinCount {
		h.src.lat.observe(20 * time.Millisecond)
	}
	if d := h.src.lat.hedgeDelay(); d != 20*time.Millisecond {
		t.Fatalf("hedge delay %v after fetches of 20 ms", d)
	}
	return h
}

func (h *hedgeSetup) bytesOf() []byte {
	off, n := h.m.Span(h.chunk)
	return h.data[off : off+n]
}

func (h *hedgeSetup) read(t *testing.T) time.Duration {
	t.Helper()
	off, n := h.m.Span(h.chunk)
	p := make([]byte, n)
	t0 := time.Now()
	if _, err := h.src.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	if !bytes.Equal(p, h.bytesOf()) {
		t.Fatal("wrong bytes")
	}
	return took
}

// hang answers after the hard timeout, or not at all if cancelled first.
func hang(ctx context.Context, hard time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(hard):
		return &FetchError{Peer: "x", Unavailable: true, Err: context.DeadlineExceeded}
	}
}

// A home that does not answer (on either connection) is hedged: the next
// candidate, asked cached-only, answers long before the hard timeout, and
// the origin is not read.
func TestHedgeSlowHome(t *testing.T) {
	const hard = 3 * time.Second
	var h *hedgeSetup
	f := &hedgeFetcher{}
	f.answer = func(ctx context.Context, p Peer, mode FetchMode, q []byte) error {
		if p.Name == h.ranked[0] {
			return hang(ctx, hard)
		}
		if !mode.CachedOnly {
			t.Errorf("%s asked to fill while the home was still asked", p.Name)
		}
		copy(q, h.bytesOf())
		return nil
	}
	h = newHedgeSetup(t, f)
	took := h.read(t)
	if took > hard/3 {
		t.Fatalf("the read took %v: not hedged before the %v timeout", took, hard)
	}
	want := []string{h.ranked[0], h.ranked[0] + " spare cached", h.ranked[1] + " cached"}
	if got := f.requests(); len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("requests %q, want %q", got, want)
	}
	st := h.src.Stats()
	if h.origin.total.Load() != 0 || st.ChunksFromPeers.Load() != 1 || st.HedgeWins.Load() != 1 || st.Hedges.Load() != 2 || st.PeerErrors.Load() != 0 {
		t.Fatalf("origin bytes %d, chunks from peers %d, hedges %d won %d, errors %d",
			h.origin.total.Load(), st.ChunksFromPeers.Load(), st.Hedges.Load(), st.HedgeWins.Load(), st.PeerErrors.Load())
	}
	t.Logf("answered by the hedge in %v", took)
}

// A stalled connection to the home costs one hedge delay: the request on
// the spare connection answers.
func TestHedgeStalledConnection(t *testing.T) {
	var h *hedgeSetup
	f := &hedgeFetcher{}
	f.answer = func(ctx context.Context, p Peer, mode FetchMode, q []byte) error {
		if p.Name == h.ranked[0] && mode.Spare {
			copy(q, h.bytesOf())
			return nil
		}
		return hang(ctx, 3*time.Second)
	}
	h = newHedgeSetup(t, f)
	if took := h.read(t); took > time.Second {
		t.Fatalf("the read took %v", took)
	}
	if got := f.requests(); len(got) != 2 {
		t.Fatalf("requests %q: want the home and its spare connection only", got)
	}
	if st := h.src.Stats(); st.HedgeWins.Load() != 1 || h.origin.total.Load() != 0 {
		t.Fatalf("hedge wins %d, origin bytes %d", st.HedgeWins.Load(), h.origin.total.Load())
	}
}

// A fast answer that fails verification is not taken: the read waits for
// the home's right bytes, and the origin is not read.
func TestHedgeCorruptFastAnswer(t *testing.T) {
	var h *hedgeSetup
	f := &hedgeFetcher{}
	f.answer = func(ctx context.Context, p Peer, mode FetchMode, q []byte) error {
		if p.Name == h.ranked[0] {
			if mode.Spare {
				return hang(ctx, 3*time.Second)
			}
			select { // slower than two hedge delays
			case <-time.After(300 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
			copy(q, h.bytesOf())
			return nil
		}
		copy(q, h.bytesOf())
		q[7] ^= 1
		return nil
	}
	h = newHedgeSetup(t, f)
	h.read(t)
	st := h.src.Stats()
	if st.CorruptChunks.Load() == 0 || st.HedgeWins.Load() != 0 || h.origin.total.Load() != 0 || st.ChunksFromPeers.Load() != 1 {
		t.Fatalf("corrupt %d, hedge wins %d, origin bytes %d, chunks from peers %d",
			st.CorruptChunks.Load(), st.HedgeWins.Load(), h.origin.total.Load(), st.ChunksFromPeers.Load())
	}
}

// When every candidate fails, the origin is read, once.
func TestHedgeAllFail(t *testing.T) {
	f := &hedgeFetcher{answer: func(ctx context.Context, p Peer, mode FetchMode, q []byte) error {
		if mode.CachedOnly {
			return &FetchError{Peer: p.Name, Status: http.StatusNotFound, Err: errors.New("not held")}
		}
		time.Sleep(50 * time.Millisecond)
		return &FetchError{Peer: p.Name, Status: http.StatusServiceUnavailable, Unavailable: true, Err: errors.New("busy")}
	}}
	h := newHedgeSetup(t, f)
	h.read(t)
	st := h.src.Stats()
	if h.origin.readsOf(h.chunk) != 1 || st.ChunksFromOrigin.Load() != 1 || st.NotHeld.Load() == 0 {
		t.Fatalf("origin reads %d, chunks from origin %d, not held %d; requests %q",
			h.origin.readsOf(h.chunk), st.ChunksFromOrigin.Load(), st.NotHeld.Load(), f.requests())
	}
	// Two full requests at most (MaxAttempts), as without hedging.
	full := 0
	for _, r := range f.requests() {
		if r == "p1" || r == "p2" || r == "p3" {
			full++
		}
	}
	if full != 2 {
		t.Fatalf("requests %q: want 2 that may fill", f.requests())
	}
}

// The hedge delay follows the 95th percentile of the recent fetches,
// within its floor and cap.
func TestHedgeDelay(t *testing.T) {
	var w latencyWindow
	if d := w.hedgeDelay(); d != hedgeFirst {
		t.Fatalf("no fetches timed: %v", d)
	}
	for i := range latencySamples {
		d := 30 * time.Millisecond
		if i%20 == 0 { // 5 %
			d = 400 * time.Millisecond
		}
		w.observe(d)
	}
	if d := w.hedgeDelay(); d != 30*time.Millisecond && d != 400*time.Millisecond {
		t.Fatalf("delay %v", d)
	}
	for range latencySamples {
		w.observe(time.Millisecond)
	}
	if d := w.hedgeDelay(); d != hedgeFloor {
		t.Fatalf("fast fetches: delay %v, want the floor", d)
	}
	for range latencySamples {
		w.observe(5 * time.Second)
	}
	if d := w.hedgeDelay(); d != hedgeCap {
		t.Fatalf("slow fetches: delay %v, want the cap", d)
	}
}

// Over real TLS: a cached-only request for a chunk the peer does not hold
// is answered 404 without reading its origin; once it holds the chunk it
// serves it.
func TestCachedOnlyRequest(t *testing.T) {
	ca := testCA(t)
	data := randomBytes(22, 16*hedgeChunk)
	m := manifestOf(t, data, hedgeChunk)
	nodes := cluster(t, ca, 2, data, m, clusterOpts{})
	asker, holder := nodes[0], nodes[1]
	var c int64 = -1
	for i := range int64(16) {
		if Weight(holder.name, testKey.ID, i) > Weight(asker.name, testKey.ID, i) {
			c = i
			break
		}
	}
	if c < 0 {
		t.Fatal("no chunk the holder outweighs the asker for")
	}
	off, n := m.Span(c)
	p := make([]byte, n)
	err := asker.client.FetchWith(context.Background(), Peer{holder.name, holder.addr}, Request{testKey, hedgeChunk, c}, p, FetchMode{CachedOnly: true})
	var fe *FetchError
	if !errors.As(err, &fe) || fe.Status != http.StatusNotFound || fe.Unavailable {
		t.Fatalf("cached-only request of a chunk not held: %v", err)
	}
	if holder.origin.total.Load() != 0 || holder.srv.Stats().Failed != 0 {
		t.Fatalf("the holder read %d bytes of its origin, %d failed", holder.origin.total.Load(), holder.srv.Stats().Failed)
	}
	if _, err := holder.ref.ReadAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
	read := holder.origin.total.Load()
	if err := asker.client.FetchWith(context.Background(), Peer{holder.name, holder.addr}, Request{testKey, hedgeChunk, c}, p, FetchMode{CachedOnly: true, Spare: true}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, data[off:off+n]) || holder.origin.total.Load() != read {
		t.Fatal("wrong bytes, or read from the origin again")
	}
}

// The home's connection stalls after it filled the chunk: its first spare
// hedge came while it was filling ("not held"), a second one answers.
func TestHedgeSpareAgainAfterFill(t *testing.T) {
	var h *hedgeSetup
	var mu sync.Mutex
	spares := 0
	f := &hedgeFetcher{}
	f.answer = func(ctx context.Context, p Peer, mode FetchMode, q []byte) error {
		switch {
		case p.Name != h.ranked[0]:
			return &FetchError{Peer: p.Name, Status: http.StatusNotFound, Err: errors.New("not held")}
		case mode.Spare:
			mu.Lock()
			spares++
			first := spares == 1
			mu.Unlock()
			if first {
				return &FetchError{Peer: p.Name, Status: http.StatusNotFound, Err: errors.New("not held")}
			}
			copy(q, h.bytesOf())
			return nil
		}
		return hang(ctx, 3*time.Second)
	}
	h = newHedgeSetup(t, f)
	if took := h.read(t); took > time.Second {
		t.Fatalf("the read took %v", took)
	}
	st := h.src.Stats()
	if spares != 2 || st.HedgeWins.Load() != 1 || st.NotHeld.Load() == 0 || h.origin.total.Load() != 0 || st.PeerErrors.Load() != 0 {
		t.Fatalf("spare hedges %d, wins %d, not held %d, origin bytes %d, errors %d; requests %q",
			spares, st.HedgeWins.Load(), st.NotHeld.Load(), h.origin.total.Load(), st.PeerErrors.Load(), f.requests())
	}
}

// countingListener counts the connections accepted.
type countingListener struct {
	net.Listener
	n atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// A request that times out leaves its connection to its own requests: the
// next request to that peer goes on a new one. A spare request goes on a
// connection of its own.
func TestClientConnections(t *testing.T) {
	ca := testCA(t)
	data := randomBytes(23, 4*hedgeChunk)
	srv := NewServer("home", ServerOptions{})
	release := make(chan struct{})
	defer close(release)
	if _, err := srv.Register(testKey, int64(len(data)), readerFunc(func(p []byte, off int64) error {
		if off == 0 {
			<-release // chunk 0 never comes in time
		}
		copy(p, data[off:])
		return nil
	})); err != nil {
		t.Fatal(err)
	}
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &countingListener{Listener: raw}
	go srv.Serve(l, identity(t, ca, "home"))
	defer srv.Close()
	asker := ""
	for i := 0; asker == "" && i < 1000; i++ { // a name the home outweighs for chunks 0-3
		name := "asker" + strconv.Itoa(i)
		ok := true
		for c := range int64(4) {
			ok = ok && Weight("home", testKey.ID, c) > Weight(name, testKey.ID, c)
		}
		if ok {
			asker = name
		}
	}
	cl := NewClient(identity(t, ca, asker), ClientOptions{Timeout: 300 * time.Millisecond})
	defer cl.Close()
	home := Peer{"home", raw.Addr().String()}
	p := make([]byte, hedgeChunk)
	if err := cl.Fetch(context.Background(), home, Request{testKey, hedgeChunk, 1}, p); err != nil {
		t.Fatal(err)
	}
	if err := cl.Fetch(context.Background(), home, Request{testKey, hedgeChunk, 0}, p); fetchOutcome(err) != OutcomeTimeout {
		t.Fatalf("chunk 0: %v, want a timeout", err)
	}
	if err := cl.Fetch(context.Background(), home, Request{testKey, hedgeChunk, 2}, p); err != nil || !bytes.Equal(p, data[2*hedgeChunk:3*hedgeChunk]) {
		t.Fatalf("chunk 2 after a timeout: %v", err)
	}
	if n := l.n.Load(); n != 2 {
		t.Fatalf("%d connections after a timeout, want 2", n)
	}
	if err := cl.FetchWith(context.Background(), home, Request{testKey, hedgeChunk, 3}, p, FetchMode{Spare: true}); err != nil {
		t.Fatal(err)
	}
	if n := l.n.Load(); n != 3 {
		t.Fatalf("%d connections with a spare request, want 3", n)
	}
}
