package peers

import (
	"bytes"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/peers/pkitest"
)

func memberOf(m *Membership, name string) (Member, bool) {
	for _, mb := range m.Members() {
		if mb.Name == name {
			return mb, true
		}
	}
	return Member{}, false
}

// Members as memberlist sees them: a crash shows as suspect, then dead; a
// goodbye as left; both keep their last bases but are no home; a member
// that comes back is alive and serving again; a gone member is forgotten
// after ForgetAfter.
func TestMembershipStates(t *testing.T) {
	tune := func(c *memberlist.Config) {
		fastGossip(c)
		c.SuspicionMult = 6 // suspect for about a second: long enough to be seen
	}
	var mu sync.Mutex
	seenByA := map[string][]string{} // member -> "from>to" as a's OnState told
	start := func(name, bind string, join []string) *Membership {
		o := MembershipOptions{Name: name, Bind: bind, Join: join, ChunkAddr: "127.0.0.1:1",
			Tune: tune, ForgetAfter: 1500 * time.Millisecond}
		if name == "s-a" {
			o.OnState = func(m Member, from string) {
				mu.Lock()
				seenByA[m.Name] = append(seenByA[m.Name], from+">"+m.State)
				mu.Unlock()
			}
		}
		m, err := JoinCluster(o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Shutdown() })
		return m
	}
	a := start("s-a", "127.0.0.1:0", nil)
	b := start("s-b", "127.0.0.1:0", []string{a.GossipAddr()})
	c := start("s-c", "127.0.0.1:0", []string{a.GossipAddr()})
	for _, m := range []*Membership{b, c} {
		if err := m.SetBases([]string{"img.g1"}); err != nil {
			t.Fatal(err)
		}
	}
	d := waitFor(t, "a sees b and c alive, serving", 5*time.Second, func() bool { return len(a.Serving("img.g1")) == 2 })
	t.Logf("join seen in %v", d)
	for _, mb := range a.Members() {
		if mb.State != StateAlive || mb.Since.IsZero() || mb.Self != (mb.Name == "s-a") {
			t.Fatalf("after joining: %+v", mb)
		}
	}

	// b crashes: a sees it suspect, then dead.
	bAddr := b.GossipAddr()
	killed := time.Now()
	b.Shutdown()
	var seen []string
	var since []time.Time
	waitFor(t, "b dead", 8*time.Second, func() bool {
		mb, _ := memberOf(a, "s-b")
		if len(seen) == 0 || seen[len(seen)-1] != mb.State {
			seen, since = append(seen, mb.State), append(since, mb.Since)
		}
		time.Sleep(5 * time.Millisecond)
		return mb.State == StateDead
	})
	t.Logf("b: %v at %v after the kill", seen, time.Since(killed))
	if !slices.Equal(seen, []string{StateAlive, StateSuspect, StateDead}) || !since[1].After(since[0]) || !since[2].After(since[1]) {
		t.Fatalf("b went through %v (since %v), want alive, suspect, dead", seen, since)
	}
	if mb, _ := memberOf(a, "s-b"); !slices.Equal(mb.Bases, []string{"img.g1"}) || mb.Live() {
		t.Fatalf("dead b: %+v", mb)
	}
	if s := a.Serving("img.g1"); len(s) != 1 || s[0].Name != "s-c" {
		t.Fatalf("a dead member is still a home: %v", s)
	}

	// c says goodbye: left, at once.
	if err := c.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	d = waitFor(t, "c left", 5*time.Second, func() bool { mb, _ := memberOf(a, "s-c"); return mb.State == StateLeft })
	t.Logf("leave seen in %v", d)
	if len(a.Serving("img.g1")) != 0 {
		t.Fatalf("a departed member is still a home: %v", a.Serving("img.g1"))
	}

	// b comes back on its old address: alive and a home again.
	b2 := start("s-b", bAddr, []string{a.GossipAddr()})
	if err := b2.SetBases([]string{"img.g1"}); err != nil {
		t.Fatal(err)
	}
	// (A probe sent as it comes back may still fail: suspect, until the
	// next one is acked.)
	d = waitFor(t, "b back", 5*time.Second, func() bool {
		mb, _ := memberOf(a, "s-b")
		return len(a.Serving("img.g1")) == 1 && mb.State == StateAlive
	})
	t.Logf("return seen in %v", d)
	if mb, _ := memberOf(a, "s-b"); !mb.Since.After(since[2]) {
		t.Fatalf("b back: %+v", mb)
	}

	// Gone members are forgotten after ForgetAfter; live ones are not.
	waitFor(t, "c forgotten", 5*time.Second, func() bool { return !a.Knows("s-c") })
	if !a.Knows("s-b") || !a.Knows("s-a") {
		t.Fatal("a live member was forgotten")
	}

	// OnState told every change, in order.
	mu.Lock()
	defer mu.Unlock()
	t.Logf("a's OnState: %v", seenByA)
	if got := seenByA["s-c"]; !slices.Equal(got, []string{">alive", "alive>left"}) {
		t.Errorf("c: %v", got)
	}
	if got := seenByA["s-b"]; len(got) < 4 || !slices.Equal(got[:4], []string{">alive", "alive>suspect", "suspect>dead", "dead>alive"}) {
		t.Errorf("b: %v", got)
	}
	if got := seenByA["s-a"]; !slices.Equal(got, []string{">alive"}) {
		t.Errorf("a itself: %v", got)
	}
}

// gossipNode is a compute node of TestDeadMemberNoHomeUntilBack: gossip,
// a chunk server, and a template base cache filling from a peer Source.
type gossipNode struct {
	ms      *Membership
	srv     *Server
	traffic *Traffic
	src     *Source
	ref     *cache.Ref
}

func startGossipNode(t *testing.T, ca *pkitest.CA, name, bind string, join []string, data []byte, m *Manifest) *gossipNode {
	t.Helper()
	id := identity(t, ca, name)
	g := &gossipNode{traffic: NewTraffic()}
	g.srv = NewServer(name, ServerOptions{Traffic: g.traffic})
	addr := serve(t, g.srv, id)
	ms, err := JoinCluster(MembershipOptions{Name: name, Bind: bind, Join: join, ChunkAddr: addr, Tune: fastGossip})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ms.Shutdown() })
	g.ms = ms
	cl := NewClient(id, ClientOptions{Timeout: 300 * time.Millisecond})
	t.Cleanup(cl.Close)
	if g.src, err = NewSource(newCounting(data, m.ChunkSize), SourceOptions{Key: testKey, Manifest: m, Members: ms, Fetcher: cl, Traffic: g.traffic}); err != nil {
		t.Fatal(err)
	}
	mgr, err := cache.NewManager(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if g.ref, err = mgr.Open(testKey.ID, cache.Binding{Template: testKey.Template, Generation: testKey.Generation, Origin: "path:/img"}, g.src, m.ChunkSize); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.ref.Close() })
	unreg, err := g.srv.Register(testKey, int64(len(data)), g.src.ServeFrom(g.ref))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(unreg)
	if err := ms.SetBases([]string{testKey.ID}); err != nil {
		t.Fatal(err)
	}
	return g
}

// A member that crashed is seen dead and never asked for a chunk (no
// failed fetch, no timeout); when it comes back it is a home again and
// serves the chunks it is home of.
func TestDeadMemberNoHomeUntilBack(t *testing.T) {
	const chunk, chunks = 16 << 10, 90
	data := randomBytes(21, chunks*chunk)
	m := manifestOf(t, data, chunk)
	ca := testCA(t)
	a := startGossipNode(t, ca, "h-a", "127.0.0.1:0", nil, data, m)
	join := []string{a.ms.GossipAddr()}
	b := startGossipNode(t, ca, "h-b", "127.0.0.1:0", join, data, m)
	c := startGossipNode(t, ca, "h-c", "127.0.0.1:0", join, data, m)
	waitFor(t, "three serving", 5*time.Second, func() bool {
		return len(a.ms.Serving(testKey.ID)) == 3 && len(b.ms.Serving(testKey.ID)) == 3
	})

	// c crashes: gossip and chunk server gone without a word.
	cAddr := c.ms.GossipAddr()
	c.ms.Shutdown()
	c.srv.Close()
	waitFor(t, "c dead on a and b", 8*time.Second, func() bool {
		ma, _ := memberOf(a.ms, "h-c")
		mb, _ := memberOf(b.ms, "h-c")
		return ma.State == StateDead && mb.State == StateDead
	})
	got := make([]byte, len(data))
	if _, err := a.ref.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("a's read with c dead: %v", err)
	}
	f := a.traffic.Fetches()
	if n := f[OutcomeError].Count + f[OutcomeTimeout].Count; n != 0 || a.src.Stats().PeerSkipped.Load() != 0 {
		t.Fatalf("a asked the dead member: %d failed fetches, %d skipped", n, a.src.Stats().PeerSkipped.Load())
	}
	if _, ok := a.traffic.Members()["h-c"]; ok {
		t.Fatal("a has traffic with the dead member")
	}

	// c comes back (a new process: empty cache, new chunk server port).
	c2 := startGossipNode(t, ca, "h-c", cAddr, join, data, m)
	waitFor(t, "c back on b", 5*time.Second, func() bool { return len(b.ms.Serving(testKey.ID)) == 3 })
	if _, err := b.ref.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("b's read with c back: %v", err)
	}
	homeOfC := 0
	for i := range int64(chunks) {
		if Rank([]string{"h-a", "h-b", "h-c"}, testKey.ID, i)[0] == "h-c" {
			homeOfC++
		}
	}
	recv := b.traffic.Members()["h-c"].Received
	// (A server counts a chunk once its write returned: maybe just after
	// the asker has it.)
	settled(t, func() bool { return c2.traffic.Members()["h-b"].Served == recv })
	t.Logf("c is home of %d of %d chunks; b received %d bytes from it, c served b %d", homeOfC, chunks, recv, c2.traffic.Members()["h-b"].Served)
	if homeOfC == 0 || recv == 0 || recv != c2.traffic.Members()["h-b"].Served {
		t.Fatal("the member that came back was not used again")
	}
	if f := b.traffic.Fetches(); f[OutcomeError].Count+f[OutcomeTimeout].Count+f[OutcomeCorrupt].Count != 0 {
		t.Fatalf("b's fetches: %+v", f)
	}
}
