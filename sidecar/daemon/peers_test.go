package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/peers"
	"github.com/vmthunder/vmthunder/sidecar/peers/pkitest"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

// peerEnvs starts n daemons on loopback with [peers] enabled (certs from
// one test CA), each with a file origin holding content, the manifest of
// template tmpl generation gen1 imported, and a readonly export "vm" of
// it; it returns once every node sees all n serving the base. more, if
// given, adjusts each node's config further.
func peerEnvs(t *testing.T, n int, content []byte, more ...func(*config.Config)) ([]*env, string) {
	t.Helper()
	// Quick gossip, so joins and bases are seen at once; failure detection
	// no quicker than a busy 2-core machine allows: an ack late by 80 ms
	// under a wave's load made memberlist declare a live node dead (and
	// its chunks' homes move) within 300 ms.
	peerTune = func(c *memberlist.Config) {
		c.GossipInterval = 30 * time.Millisecond
		c.ProbeInterval = 500 * time.Millisecond
		c.ProbeTimeout = 400 * time.Millisecond
		c.SuspicionMult = 6
		c.TCPTimeout = 500 * time.Millisecond
		c.PushPullInterval = time.Second
	}
	t.Cleanup(func() { peerTune = nil })
	ca, err := pkitest.NewCA("vmthunder-test-ca")
	if err != nil {
		t.Fatal(err)
	}
	man, err := peers.ComputeManifest(context.Background(), memdev.FromBytes(content, true), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := man.MarshalBinary()
	base := stack.TemplateBaseID("tmpl", "gen1")
	var envs []*env
	var join []string
	for i := range n {
		caF, certF, keyF, err := ca.WriteFiles(t.TempDir(), fmt.Sprintf("node%d", i))
		if err != nil {
			t.Fatal(err)
		}
		e := newEnv(t, func(c *config.Config) {
			c.Peers = config.Peers{Enabled: true, Bind: "127.0.0.1:0", Listen: "127.0.0.1:0", Join: join,
				CAFile: caF, CertFile: certF, KeyFile: keyF}
			for _, f := range more {
				f(c)
			}
		})
		if i == 0 {
			join = []string{e.d.peers.ml.GossipAddr()}
		}
		if _, err := e.d.ImportManifest(base, bytes.NewReader(raw), man.Root()); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(e.dir, "template.img")
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := e.d.Create(&api.CreateRequest{ID: "vm", Origin: p, Base: "tmpl", Generation: "gen1", Mode: api.ModeReadOnly}); err != nil {
			t.Fatal(err)
		}
		envs = append(envs, e)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, e := range envs {
		for len(e.d.peers.ml.Serving(base)) < n {
			if time.Now().After(deadline) {
				t.Fatalf("%s sees %d members serving %s, want %d: %+v", e.d.peers.ml.Self(), len(e.d.peers.ml.Serving(base)), base, n, e.d.Peers())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, e := range envs {
		b, err := e.d.Base(base)
		if err != nil {
			t.Fatal(err)
		}
		if b.Peers == nil || b.Peers.Source != "peers" || b.Peers.ManifestRoot != man.Root() {
			t.Fatalf("base view: %+v", b.Peers)
		}
	}
	return envs, base
}

// readAll reads each export whole with nbdcopy, all at once.
func readAll(t *testing.T, envs []*env) [][]byte {
	t.Helper()
	out := make([][]byte, len(envs))
	errs := make([]error, len(envs))
	var wg sync.WaitGroup
	for i, e := range envs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f := filepath.Join(t.TempDir(), "out.raw")
			uri := "nbd+unix:///vm?socket=" + e.d.socketPath("vm")
			if b, err := exec.Command("nbdcopy", uri, f).CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("nbdcopy %s: %v: %s", uri, err, b)
				return
			}
			out[i], errs[i] = os.ReadFile(f)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// Three nodes boot one template at once: the origins together send about
// one copy of it (each chunk once), and every node reads every byte right.
func TestPeersWaveOneCopy(t *testing.T) {
	const size = 16 << 20
	content := make([]byte, size)
	rand.Read(content)
	envs, base := peerEnvs(t, 3, content)
	t0 := time.Now()
	got := readAll(t, envs)
	var origin, fromPeers, served uint64
	for i, e := range envs {
		if !bytes.Equal(got[i], content) {
			t.Fatalf("node%d read wrong bytes", i)
		}
		b, _ := e.d.Base(base)
		origin += b.Peers.FromOriginBytes
		fromPeers += b.Peers.FromPeersBytes
		served += b.Peers.ServedBytes
		t.Logf("node%d: from origin %d, from peers %d, served %d", i, b.Peers.FromOriginBytes, b.Peers.FromPeersBytes, b.Peers.ServedBytes)
	}
	t.Logf("3 nodes read %d bytes each in %v: origins sent %d bytes together (%.3f copies), peers %d", size, time.Since(t0), origin, float64(origin)/size, fromPeers)
	if origin < size || origin > size*11/10 {
		t.Fatalf("origins sent %d bytes for a %d-byte template on 3 nodes: want about one copy", origin, size)
	}
	if fromPeers != served || fromPeers < size {
		t.Fatalf("from peers %d, served %d: want equal and at least one copy", fromPeers, served)
	}
	// The metrics say the same.
	mf, err := envs[0].d.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, f := range mf {
		seen[f.GetName()] = true
	}
	for _, name := range []string{"vmthunder_peer_read_bytes_total", "vmthunder_peer_served_bytes_total", "vmthunder_peer_corrupt_chunks_total", "vmthunder_peer_members"} {
		if !seen[name] {
			t.Errorf("metric %s missing", name)
		}
	}
	if p := envs[0].d.Peers(); len(p.Members) != 3 || len(p.Members[0].Bases) != 1 {
		t.Errorf("GET /v1/peers: %+v", p)
	}
}

// A node serves corrupt chunks: they are detected and dropped, and no
// other node reads a corrupt byte.
func TestPeersCorruptChunksNeverRead(t *testing.T) {
	const size = 8 << 20
	content := make([]byte, size)
	rand.Read(content)
	envs, base := peerEnvs(t, 3, content)
	envs[0].d.peers.srv.SetCorrupt(true)
	got := readAll(t, envs)
	var corrupt uint64
	for i, e := range envs {
		if !bytes.Equal(got[i], content) {
			t.Fatalf("node%d read wrong bytes", i)
		}
		b, _ := e.d.Base(base)
		corrupt += b.Peers.CorruptChunks
	}
	if corrupt == 0 {
		t.Fatal("no corrupt chunk was detected, though node0 served only corrupt ones")
	}
	// What the caches kept is right too.
	again := readAll(t, envs[1:])
	for i := range again {
		if !bytes.Equal(again[i], content) {
			t.Fatalf("node%d read wrong bytes from its cache", i+1)
		}
	}
	t.Logf("%d corrupt chunks detected and dropped", corrupt)
}
