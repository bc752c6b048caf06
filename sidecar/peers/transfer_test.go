package peers

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"
)

func manifestOf(t testing.TB, data []byte, chunk int64) *Manifest {
	t.Helper()
	m, err := ComputeManifest(context.Background(), newCounting(data, chunk), chunk)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// A wave: every node reads the whole base at once, in its own order. The
// origins send each chunk exactly once in all (each chunk's home fills it,
// once for every asker), and every node reads the right bytes.
func TestWaveEachChunkFromOriginOnce(t *testing.T) {
	const chunk, chunks = 64 << 10, 48
	data := randomBytes(3, chunks*chunk-1000)
	m := manifestOf(t, data, chunk)
	nodes := cluster(t, testCA(t), 4, data, m, clusterOpts{})

	var wg sync.WaitGroup
	for i, nd := range nodes {
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(i), uint64(w)))
				for _, c := range r.Perm(chunks) {
					if !nd.readChunk(t, m, data, int64(c)) {
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	var fromPeers uint64
	for c := range int64(chunks) {
		total := 0
		for _, nd := range nodes {
			total += nd.origin.readsOf(c)
		}
		if total != 1 {
			t.Errorf("chunk %d read %d times from the origins, want once", c, total)
		}
	}
	for _, nd := range nodes {
		st := nd.src.Stats()
		fromPeers += st.ChunksFromPeers.Load()
		if st.CorruptChunks.Load() != 0 || st.PeerErrors.Load() != 0 {
			t.Errorf("%s: %d corrupt, %d errors", nd.name, st.CorruptChunks.Load(), st.PeerErrors.Load())
		}
	}
	// 4 nodes x 48 chunks, 48 of them from the origins.
	if fromPeers != 3*chunks {
		t.Errorf("%d chunks from peers, want %d", fromPeers, 3*chunks)
	}
	// Per member: what a node received from another is what that one
	// served it, and every fetch was timed as ok.
	settled(t, func() bool {
		for _, a := range nodes {
			for _, b := range nodes {
				if a.traffic.Members()[b.name].Received != b.traffic.Members()[a.name].Served {
					return false
				}
			}
		}
		return true
	})
	var received uint64
	for _, a := range nodes {
		for _, b := range nodes {
			got, sent := a.traffic.Members()[b.name].Received, b.traffic.Members()[a.name].Served
			if got != sent {
				t.Errorf("%s received %d bytes from %s, which served it %d", a.name, got, b.name, sent)
			}
			received += got
		}
		f := a.traffic.Fetches()
		if f[OutcomeOK].Count != a.src.Stats().ChunksFromPeers.Load() || f[OutcomeError].Count+f[OutcomeTimeout].Count+f[OutcomeCorrupt].Count != 0 {
			t.Errorf("%s: fetch histogram %+v, %d chunks from peers", a.name, f, a.src.Stats().ChunksFromPeers.Load())
		}
	}
	{
		var total uint64
		for _, nd := range nodes {
			total += nd.src.Stats().BytesFromPeers.Load()
		}
		if received != total {
			t.Errorf("per-member received bytes %d, per-base %d", received, total)
		}
	}
}

// Many askers at once (8 nodes, 4 requests each) for one chunk of a slow
// origin: the home reads it from its origin once and answers them all.
func TestHomeSingleFlight(t *testing.T) {
	const chunk, c = 64 << 10, 3
	data := randomBytes(4, 8*chunk)
	m := manifestOf(t, data, chunk)
	ca := testCA(t)
	nodes := cluster(t, ca, 1, data, m, clusterOpts{})
	home := nodes[0]
	home.origin.delay = 100 * time.Millisecond
	// Askers whose weight for the chunk is below the home's (the home
	// refuses the others: they would be the better home).
	var askers []*Client
	for i := 0; len(askers) < 8; i++ {
		name := fmt.Sprintf("asker-%d", i)
		if Weight(name, testKey.ID, c) < Weight(home.name, testKey.ID, c) {
			cl := NewClient(identity(t, ca, name), ClientOptions{})
			t.Cleanup(cl.Close)
			askers = append(askers, cl)
		}
	}
	var wg sync.WaitGroup
	for _, cl := range askers {
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, n := m.Span(c)
				p := make([]byte, n)
				if err := cl.Fetch(context.Background(), Peer{home.name, home.addr}, Request{testKey, chunk, c}, p); err != nil {
					t.Error(err)
				} else if !m.Verify(c, p) {
					t.Error("wrong bytes")
				}
			}()
		}
	}
	wg.Wait()
	if got := home.origin.readsOf(c); got != 1 {
		t.Fatalf("home read chunk %d %d times from its origin, want once", c, got)
	}
	settled(t, func() bool { return home.srv.Stats().Requests == 32 })
	if st := home.srv.Stats(); st.Requests != 32 {
		t.Fatalf("served %d requests, want 32", st.Requests)
	}
	// Each asker was served its 4 chunks, by name.
	for name, b := range home.traffic.Members() {
		if b.Served != 4*chunk {
			t.Errorf("served %s %d bytes, want %d", name, b.Served, 4*chunk)
		}
	}
	if len(home.traffic.Members()) != 8 {
		t.Errorf("served %d askers, want 8", len(home.traffic.Members()))
	}
}

// A node serving corrupt bytes: every chunk it sends is dropped and
// counted, the next candidate or the origin is used, and nothing wrong
// reaches any reader's cache.
func TestCorruptPeerIsNotBelieved(t *testing.T) {
	const chunk, chunks = 16 << 10, 64
	data := randomBytes(5, chunks*chunk)
	m := manifestOf(t, data, chunk)
	nodes := cluster(t, testCA(t), 3, data, m, clusterOpts{attempts: 2})
	bad := nodes[1]
	bad.srv.SetCorrupt(true)
	var corrupt uint64
	for _, nd := range []*node{nodes[0], nodes[2]} {
		got := make([]byte, len(data))
		if _, err := nd.ref.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%s read wrong bytes", nd.name)
		}
		// The cache holds the right bytes (read again: all hits).
		if _, err := nd.ref.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: cache holds wrong bytes", nd.name)
		}
		corrupt += nd.src.Stats().CorruptChunks.Load()
	}
	if corrupt == 0 || bad.srv.Stats().Requests == 0 {
		t.Fatalf("corrupt chunks %d, requests to the bad node %d: the fault was not exercised", corrupt, bad.srv.Stats().Requests)
	}
	// Timed as corrupt, and no byte from the bad node counted as received.
	var timed uint64
	for _, nd := range []*node{nodes[0], nodes[2]} {
		timed += nd.traffic.Fetches()[OutcomeCorrupt].Count
		if r := nd.traffic.Members()[bad.name].Received; r != 0 {
			t.Errorf("%s counts %d bytes received from the corrupt node", nd.name, r)
		}
	}
	if timed != corrupt {
		t.Errorf("%d corrupt fetches timed, %d counted", timed, corrupt)
	}
}

// Peers that are dead, slow or answer errors cost a reader time, never a
// failed or wrong read; a peer that is fixed is used again after the
// cool-down.
func TestFailingPeersFallBack(t *testing.T) {
	const chunk, chunks = 16 << 10, 40
	data := randomBytes(6, chunks*chunk)
	m := manifestOf(t, data, chunk)
	ca := testCA(t)

	dead := identity(t, ca, "dead")
	deadSrv := NewServer("dead", ServerOptions{})
	deadAddr := serve(t, deadSrv, dead)
	deadSrv.Close() // nothing listens there any more

	slowSrv := NewServer("slow", ServerOptions{})
	slowAddr := serve(t, slowSrv, identity(t, ca, "slow"))
	release := make(chan struct{})
	defer close(release)
	if _, err := slowSrv.Register(testKey, int64(len(data)), readerFunc(func(p []byte, off int64) error {
		select {
		case <-release:
		case <-time.After(5 * time.Second):
		}
		copy(p, data[off:])
		return nil
	})); err != nil {
		t.Fatal(err)
	}

	errSrv := NewServer("erring", ServerOptions{})
	errAddr := serve(t, errSrv, identity(t, ca, "erring"))
	var mu sync.Mutex
	failing := true
	if _, err := errSrv.Register(testKey, int64(len(data)), readerFunc(func(p []byte, off int64) error {
		mu.Lock()
		defer mu.Unlock()
		if failing {
			return errors.New("origin unreachable")
		}
		copy(p, data[off:])
		return nil
	})); err != nil {
		t.Fatal(err)
	}

	me := "reader"
	cl := NewClient(identity(t, ca, me), ClientOptions{Timeout: 150 * time.Millisecond})
	defer cl.Close()
	origin := newCounting(data, chunk)
	traffic := NewTraffic()
	src, err := NewSource(origin, SourceOptions{Key: testKey, Manifest: m, Fetcher: cl, MaxAttempts: 3, Cooldown: 300 * time.Millisecond, Traffic: traffic,
		Members: StaticMembers{Me: me, Peers: []Peer{{"dead", deadAddr}, {"slow", slowAddr}, {"erring", errAddr}}}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got := make([]byte, len(data))
	for c := range int64(chunks) {
		off, n := m.Span(c)
		if _, err := src.ReadAt(got[off:off+n], off); err != nil {
			t.Fatalf("chunk %d: %v", c, err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("wrong bytes")
	}
	st := src.Stats()
	if st.PeerErrors.Load() == 0 || st.ChunksFromPeers.Load() != 0 || st.ChunksFromOrigin.Load() != chunks {
		t.Fatalf("errors %d, from peers %d, from origin %d", st.PeerErrors.Load(), st.ChunksFromPeers.Load(), st.ChunksFromOrigin.Load())
	}
	// The slow peer costs one timeout per cool-down, not one per chunk.
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("40 chunks took %v behind failing peers", el)
	}
	t.Logf("40 chunks in %v: %d peer errors, %d skipped", time.Since(start), st.PeerErrors.Load(), st.PeerSkipped.Load())
	// The slow peer's fetches are timed as timeouts (at about the client's
	// timeout), the dead and erring ones' as errors.
	f := traffic.Fetches()
	if f[OutcomeTimeout].Count == 0 || f[OutcomeError].Count == 0 || f[OutcomeOK].Count != 0 ||
		f[OutcomeTimeout].Count+f[OutcomeError].Count != st.PeerErrors.Load() {
		t.Fatalf("fetch outcomes %+v, %d peer errors", f, st.PeerErrors.Load())
	}
	if slow := f[OutcomeTimeout]; slow.Sum/float64(slow.Count) < 0.1 || slow.Buckets[0.1] != 0 {
		t.Fatalf("timeouts took %.3f s on average, buckets %v: want about the 150 ms timeout", slow.Sum/float64(slow.Count), slow.Buckets)
	}

	// The erring peer is fixed: after the cool-down it serves again.
	mu.Lock()
	failing = false
	mu.Unlock()
	time.Sleep(350 * time.Millisecond)
	for c := range int64(chunks) {
		off, n := m.Span(c)
		if _, err := src.ReadAt(got[off:off+n], off); err != nil {
			t.Fatalf("chunk %d: %v", c, err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("wrong bytes")
	}
	if st.ChunksFromPeers.Load() == 0 || errSrv.Stats().Requests == 0 {
		t.Fatal("the peer that came back was not used again")
	}
	if r := traffic.Members()["erring"].Received; r != st.BytesFromPeers.Load() || traffic.Fetches()[OutcomeOK].Count != st.ChunksFromPeers.Load() {
		t.Fatalf("received from the fixed peer %d bytes, from peers %d; ok fetches %d", r, st.BytesFromPeers.Load(), traffic.Fetches()[OutcomeOK].Count)
	}
}

type readerFunc func(p []byte, off int64) error

func (f readerFunc) ReadChunk(p []byte, off int64) error { return f(p, off) }

// Reads that are not whole manifest chunks go to the origin; a base
// without a manifest, or with one of another size, has no peer source.
func TestSourceEdges(t *testing.T) {
	const chunk = 4096
	data := randomBytes(7, 4*chunk+100)
	m := manifestOf(t, data, chunk)
	origin := newCounting(data, chunk)
	fetches := 0
	src, err := NewSource(origin, SourceOptions{Key: testKey, Manifest: m,
		Members: StaticMembers{Me: "me", Peers: []Peer{{"p1", "127.0.0.1:1"}, {"p2", "127.0.0.1:1"}}},
		Fetcher: fetchFunc(func(ctx context.Context, p Peer, r Request, q []byte) error { fetches++; return errors.New("no") })})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, n int64 }{{1, 100}, {0, 100}, {chunk, chunk - 1}, {4 * chunk, 100}, {0, 2 * chunk}} {
		p := make([]byte, c.n)
		if _, err := src.ReadAt(p, c.off); err != nil || !bytes.Equal(p, data[c.off:c.off+c.n]) {
			t.Fatalf("read %d+%d: %v", c.off, c.n, err)
		}
	}
	if _, err := src.ReadAt(make([]byte, 10), int64(len(data))-5); err == nil {
		t.Fatal("read past the end")
	}
	if fetches == 0 || fetches > 3*2 {
		t.Fatalf("%d fetches for the 3 whole-chunk reads", fetches)
	}
	if _, err := src.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("write accepted")
	}
	if _, err := NewSource(origin, SourceOptions{Key: testKey, Members: StaticMembers{}, Fetcher: fetchFunc(nil)}); !errors.Is(err, ErrManifest) {
		t.Fatalf("no manifest: %v", err)
	}
	short := manifestOf(t, data[:4*chunk], chunk)
	if _, err := NewSource(origin, SourceOptions{Key: testKey, Manifest: short, Members: StaticMembers{}, Fetcher: fetchFunc(nil)}); !errors.Is(err, ErrManifest) {
		t.Fatalf("manifest of another size: %v", err)
	}
}

type fetchFunc func(ctx context.Context, p Peer, r Request, q []byte) error

func (f fetchFunc) Fetch(ctx context.Context, p Peer, r Request, q []byte) error {
	return f(ctx, p, r, q)
}

// The server refuses what it must not answer, with the right status.
func TestServerRefusals(t *testing.T) {
	const chunk = 4096
	data := randomBytes(8, 4*chunk)
	ca := testCA(t)
	srv := NewServer("home", ServerOptions{MaxChunk: 64 << 10})
	addr := serve(t, srv, identity(t, ca, "home"))
	unreg, err := srv.Register(testKey, int64(len(data)), readerFunc(func(p []byte, off int64) error { copy(p, data[off:]); return nil }))
	if err != nil {
		t.Fatal(err)
	}
	defer unreg()
	if _, err := srv.Register(BaseKey{testKey.ID, testKey.Template, "other"}, int64(len(data)), nil); err == nil {
		t.Fatal("a base id registered for two generations")
	}
	// An asker below the home for chunk c, and one above it.
	var low, high string
	for i := 0; low == "" || high == ""; i++ {
		n := "n" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		if Weight(n, testKey.ID, 0) < Weight("home", testKey.ID, 0) {
			low = n
		} else {
			high = n
		}
	}
	cl := NewClient(identity(t, ca, low), ClientOptions{})
	defer cl.Close()
	home := Peer{"home", addr}
	status := func(cl *Client, r Request, n int) int {
		err := cl.Fetch(context.Background(), home, r, make([]byte, n))
		var fe *FetchError
		if err == nil {
			return 200
		}
		if !errors.As(err, &fe) {
			t.Fatalf("%T %v", err, err)
		}
		return fe.Status
	}
	if s := status(cl, Request{testKey, chunk, 0}, chunk); s != 200 {
		t.Fatalf("good request: %d", s)
	}
	for name, c := range map[string]struct {
		r    Request
		want int
	}{
		"unknown base":   {Request{BaseKey{"other.g1", "other", "g"}, chunk, 0}, 404},
		"generation":     {Request{BaseKey{testKey.ID, testKey.Template, "g2"}, chunk, 0}, 404},
		"past the end":   {Request{testKey, chunk, 4}, 416},
		"chunk too big":  {Request{testKey, 128 << 10, 0}, 400},
		"bad chunk size": {Request{testKey, 5000, 0}, 400},
	} {
		if s := status(cl, c.r, 100); s != c.want {
			t.Errorf("%s: status %d, want %d", name, s, c.want)
		}
	}
	hi := NewClient(identity(t, ca, high), ClientOptions{})
	defer hi.Close()
	if s := status(hi, Request{testKey, chunk, 0}, chunk); s != http.StatusMisdirectedRequest {
		t.Errorf("an asker that outweighs the home: status %d, want 421", s)
	}
	// A short answer buffer is refused by the client, not overrun.
	if err := cl.Fetch(context.Background(), home, Request{testKey, chunk, 1}, make([]byte, chunk-1)); err == nil {
		t.Error("an answer longer than the buffer was accepted")
	}
	// Raw queries: duplicated and missing parameters, other methods.
	for q, want := range map[string]int{
		"?" + Request{testKey, chunk, 0}.query() + "&index=1": 400,
		"?base=" + testKey.ID: 400,
	} {
		resp, err := cl.client(home).Get("https://home" + chunkPath + q)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s: %d, want %d", q, resp.StatusCode, want)
		}
	}
	resp, err := cl.client(home).Post("https://home"+chunkPath+"?"+Request{testKey, chunk, 0}.query(), "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.ProtoMajor != 2 {
		t.Errorf("POST: %d over HTTP/%d", resp.StatusCode, resp.ProtoMajor)
	}
}
