package peers

import (
	"bytes"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// The pieces together: three nodes find each other by gossip, advertise
// the base, and a node's cold read is served by the chunks' homes, each
// chunk read once from an origin; after a node leaves, its chunks go to
// the others' origins or homes, and reads stay right.
func TestGossipDrivenSource(t *testing.T) {
	const chunk, chunks = 16 << 10, 60
	data := randomBytes(11, chunks*chunk)
	m := manifestOf(t, data, chunk)
	ca := testCA(t)
	type gnode struct {
		ms     *Membership
		srv    *Server
		origin *countingDev
		ref    *cache.Ref
	}
	var ns []*gnode
	for i, name := range []string{"g-a", "g-b", "g-c"} {
		id := identity(t, ca, name)
		g := &gnode{srv: NewServer(name, ServerOptions{}), origin: newCounting(data, chunk)}
		addr := serve(t, g.srv, id)
		o := MembershipOptions{Name: name, Bind: "127.0.0.1:0", ChunkAddr: addr, Tune: fastGossip}
		if i > 0 {
			o.Join = []string{ns[0].ms.GossipAddr()}
		}
		ms, err := JoinCluster(o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ms.Shutdown() })
		g.ms = ms
		cl := NewClient(id, ClientOptions{Timeout: 300 * time.Millisecond})
		t.Cleanup(cl.Close)
		src, err := NewSource(g.origin, SourceOptions{Key: testKey, Manifest: m, Members: ms, Fetcher: cl})
		if err != nil {
			t.Fatal(err)
		}
		mgr, err := cache.NewManager(t.TempDir(), 0)
		if err != nil {
			t.Fatal(err)
		}
		if g.ref, err = mgr.Open(testKey.ID, cache.Binding{Template: testKey.Template, Generation: testKey.Generation, Origin: "path:/img"}, src, chunk); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.ref.Close() })
		unreg, err := g.srv.Register(testKey, int64(len(data)), src.ServeFrom(g.ref))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(unreg)
		if err := ms.SetBases([]string{testKey.ID}); err != nil {
			t.Fatal(err)
		}
		ns = append(ns, g)
	}
	waitFor(t, "every node sees three serving the base", 5*time.Second, func() bool {
		for _, g := range ns {
			if len(g.ms.Serving(testKey.ID)) != 3 {
				return false
			}
		}
		return true
	})
	got := make([]byte, len(data))
	if _, err := ns[0].ref.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("cold read through peers: %v", err)
	}
	var fromOrigins int64
	for _, g := range ns {
		fromOrigins += g.origin.total.Load()
	}
	if fromOrigins != int64(len(data)) {
		t.Fatalf("origins sent %d bytes for a base of %d", fromOrigins, len(data))
	}
	if ns[1].srv.Stats().Requests == 0 || ns[2].srv.Stats().Requests == 0 {
		t.Fatal("a home served nothing")
	}

	// g-c leaves; g-b reads everything: what g-c was home of now comes
	// from g-a (which holds all) or g-b's origin; nothing fails.
	ns[2].ms.Leave(time.Second)
	ns[2].srv.Close()
	waitFor(t, "the leave is seen", 5*time.Second, func() bool { return len(ns[1].ms.Serving(testKey.ID)) == 2 })
	if _, err := ns[1].ref.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after a leave: %v", err)
	}
}
