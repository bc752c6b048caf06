package peers

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/peers/pkitest"
)

var testKey = BaseKey{ID: "cirros.g0123456789ab", Template: "cirros", Generation: "sha256-abc"}

// countingDev is an origin that counts reads per chunk and may be slow.
type countingDev struct {
	blockdev.Device
	chunk int64
	delay time.Duration
	mu    sync.Mutex
	reads map[int64]int
	total atomic.Int64
}

func newCounting(data []byte, chunk int64) *countingDev {
	return &countingDev{Device: memdev.FromBytes(data, true), chunk: chunk, reads: map[int64]int{}}
}

func (d *countingDev) ReadAt(p []byte, off int64) (int, error) {
	if d.delay > 0 {
		time.Sleep(d.delay)
	}
	d.mu.Lock()
	for c := off / d.chunk; c <= (off+int64(len(p))-1)/d.chunk; c++ {
		d.reads[c]++
	}
	d.mu.Unlock()
	d.total.Add(int64(len(p)))
	return d.Device.ReadAt(p, off)
}

func (d *countingDev) readsOf(c int64) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reads[c]
}

func (d *countingDev) Close() error { return nil }

// settled waits up to a second for ok: a chunk server counts a chunk
// after its write returns, which may be just after the asker has it.
func settled(t testing.TB, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Second); !ok() && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
}

func testCA(t testing.TB) *pkitest.CA {
	t.Helper()
	ca, err := pkitest.NewCA("vmthunder test cluster")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func identity(t testing.TB, ca *pkitest.CA, name string) *Identity {
	t.Helper()
	cert, key, err := ca.Node(name)
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewIdentity(ca.CertPEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// serve starts srv on a loopback port over mutual TLS as id.
func serve(t testing.TB, srv *Server, id *Identity) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l, id)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// node is one simulated compute node: an origin, a cache whose template
// base fills from a peer Source, and a chunk server answering from that
// cache.
type node struct {
	name    string
	id      *Identity
	srv     *Server
	addr    string
	client  *Client
	origin  *countingDev
	src     *Source
	ref     *cache.Ref
	traffic *Traffic
}

type clusterOpts struct {
	timeout  time.Duration
	attempts int
}

// cluster starts n nodes that all have the base open over data.
func cluster(t testing.TB, ca *pkitest.CA, n int, data []byte, m *Manifest, co clusterOpts) []*node {
	t.Helper()
	nodes := make([]*node, n)
	var peers []Peer
	for i := range nodes {
		name := string(rune('a'+i)) + "-node"
		nd := &node{name: name, id: identity(t, ca, name), traffic: NewTraffic()}
		nd.srv = NewServer(name, ServerOptions{Traffic: nd.traffic})
		nd.addr = serve(t, nd.srv, nd.id)
		nd.client = NewClient(nd.id, ClientOptions{Timeout: co.timeout})
		t.Cleanup(nd.client.Close)
		peers = append(peers, Peer{Name: name, Addr: nd.addr})
		nodes[i] = nd
	}
	for _, nd := range nodes {
		nd.origin = newCounting(data, m.ChunkSize)
		src, err := NewSource(nd.origin, SourceOptions{Key: testKey, Manifest: m, Fetcher: nd.client,
			Members: StaticMembers{Me: nd.name, Peers: peers}, MaxAttempts: co.attempts, Cooldown: 200 * time.Millisecond, Traffic: nd.traffic})
		if err != nil {
			t.Fatal(err)
		}
		mgr, err := cache.NewManager(t.TempDir(), 0)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := mgr.Open(testKey.ID, cache.Binding{Template: testKey.Template, Generation: testKey.Generation, Origin: "path:/images/cirros"}, src, m.ChunkSize)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ref.Close() })
		unreg, err := nd.srv.Register(testKey, int64(len(data)), src.ServeFrom(ref))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(unreg)
		nd.src, nd.ref = src, ref
	}
	return nodes
}

// readChunk reads chunk c through the node's base and checks it against
// data, the template's bytes; false (the error reported) when it fails.
func (nd *node) readChunk(t testing.TB, m *Manifest, data []byte, c int64) bool {
	off, n := m.Span(c)
	p := make([]byte, n)
	if _, err := nd.ref.ReadAt(p, off); err != nil {
		t.Errorf("%s: chunk %d: %v", nd.name, c, err)
		return false
	}
	if !bytes.Equal(p, data[off:off+n]) {
		t.Errorf("%s: chunk %d: wrong bytes", nd.name, c)
		return false
	}
	return true
}
