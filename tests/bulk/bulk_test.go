package bulk

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

// The fault tests run small waves (4 nodes, the recorded boot with a
// twentieth of its think time) on one lab, with every replayed read
// compared with the origin's bytes.
const (
	testNodes = 4
	testThink = 0.05
)

func TestMain(m *testing.M) { os.Exit(testbin.Main(labClosing{m})) }

// labClosing runs the tests, then removes the lab (namespaces, target).
type labClosing struct{ m *testing.M }

func (l labClosing) Run() int {
	code := l.m.Run()
	if theLab != nil {
		theLab.Close()
		os.RemoveAll(theLab.o.Dir)
	}
	return code
}

var (
	labOnce sync.Once
	theLab  *Lab
	labErr  error
)

func lab(t *testing.T) *Lab {
	t.Helper()
	labOnce.Do(func() {
		var dir string
		if dir, labErr = os.MkdirTemp("", "vmthunder-bulk-test-"); labErr != nil {
			return
		}
		os.Chmod(dir, 0o755)
		var o Options
		if o.Bin, labErr = testbin.Vmthunder(); labErr != nil {
			return
		}
		var tr *Trace
		if tr, labErr = LoadTrace("testdata/boot-trace.json.gz"); labErr != nil {
			return
		}
		o.Trace = tr.Short(0, testThink)
		if o.Image, labErr = guestimage.Build(guestimage.Options{Dir: filepath.Join(dir, "image")}); labErr != nil {
			return
		}
		// A fixed tag: a killed run's namespaces are removed by the next.
		o.Dir, o.Tag, o.MaxNodes = dir, "t", testNodes
		o.Caps, labErr = CapsFromEnv()
		if labErr == nil {
			theLab, labErr = NewLab(o)
		}
	})
	if labErr != nil {
		t.Fatalf("bulk lab: %v", labErr)
	}
	return theLab
}

func wave(t *testing.T, o WaveOptions) *Wave {
	t.Helper()
	l := lab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	o.Verify = true
	w, err := l.Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range w.Nodes {
		t.Logf("node%d %s: %.0f ms, %d reads, %d failed, %d wrong; origin %d peers %d served %d corrupt %d (metric %.0f) peer errors %.0f %s",
			n.Node, n.Kind, n.BootMS, n.Reads, n.Failed, n.Mismatched, n.FromOrigin, n.FromPeers, n.Served, n.CorruptChunks, n.CorruptMetric, n.PeerErrors, n.FirstError)
	}
	t.Logf("origin sent %d bytes (%.2f working sets of %d)", w.OriginBytes, float64(w.OriginBytes)/float64(l.o.Trace.Bytes()), l.o.Trace.Bytes())
	return w
}

// A wave with peers where nothing goes wrong: every read right, and the
// nodes share the working set (the origin sends less than two copies of
// what one boot reads, where without peers it would send four).
func TestWaveWithPeers(t *testing.T) {
	w := wave(t, WaveOptions{Mode: Peers, N: testNodes, Kill: -1})
	var fromPeers uint64
	for _, n := range w.Nodes {
		if n.Failed != 0 || n.Mismatched != 0 {
			t.Errorf("node%d: %d failed, %d wrong reads: %s", n.Node, n.Failed, n.Mismatched, n.FirstError)
		}
		fromPeers += n.FromPeers
	}
	if fromPeers == 0 {
		t.Error("no node read anything from a peer")
	}
	if limit := 2 * w.Nodes[0].Bytes; w.OriginBytes > limit {
		t.Errorf("origin sent %d bytes for %d nodes reading %d each: want under two copies", w.OriginBytes, testNodes, w.Nodes[0].Bytes)
	}
}

// kill -9 one node's sidecar in the middle of a wave (its boot half
// done, and so about the others'): every other node's boot completes,
// with no failed read.
func TestWaveKillOneSidecar(t *testing.T) {
	l := lab(t)
	half := len(l.o.Trace.Reads) / 2
	w := wave(t, WaveOptions{Mode: Peers, N: testNodes, Kill: 1, KillAtRead: half})
	k := w.Nodes[1]
	if k.Failed == 0 {
		t.Fatalf("node1's sidecar was killed but its boot saw no failed read: was it killed?")
	}
	if done := k.Reads - k.Failed; done < half-1 {
		t.Fatalf("node1 completed %d reads, killed at %d", done, half)
	}
	for _, n := range w.Nodes {
		if n.Node == 1 {
			continue
		}
		if n.Failed != 0 || n.Mismatched != 0 || n.Bytes != l.o.Trace.Bytes() {
			t.Errorf("node%d: %d failed, %d wrong, %d of %d bytes read: %s", n.Node, n.Failed, n.Mismatched, n.Bytes, l.o.Trace.Bytes(), n.FirstError)
		}
	}
}

// A node serving corrupt chunks: the others detect them (the corrupt
// chunk counter rises) and no node reads a corrupt byte.
func TestWaveCorruptPeer(t *testing.T) {
	w := wave(t, WaveOptions{Mode: Peers, N: testNodes, Kill: -1, Corrupt: []int{0}})
	var detected float64
	for _, n := range w.Nodes {
		if n.Failed != 0 || n.Mismatched != 0 {
			t.Errorf("node%d: %d failed, %d wrong reads: %s", n.Node, n.Failed, n.Mismatched, n.FirstError)
		}
		if n.Node != 0 {
			detected += n.CorruptMetric
			if n.CorruptMetric != float64(n.CorruptChunks) {
				t.Errorf("node%d: vmthunder_peer_corrupt_chunks_total %.0f, the base's view says %d", n.Node, n.CorruptMetric, n.CorruptChunks)
			}
		}
	}
	if detected == 0 {
		t.Fatal("no node counted a corrupt chunk, though node0 served only corrupt ones")
	}
	if !strings.Contains(w.Logs[0], "TEST FAULT ON") {
		t.Error("node0's log does not say its fault switch is on")
	}
}

// A node whose certificate is not signed by the cluster CA gets nothing
// from the peers; its reads still succeed, from the origin.
func TestWaveRogueCert(t *testing.T) {
	w := wave(t, WaveOptions{Mode: Peers, N: testNodes, Kill: -1, Rogue: []int{2}})
	for _, n := range w.Nodes {
		if n.Failed != 0 || n.Mismatched != 0 {
			t.Errorf("node%d: %d failed, %d wrong reads: %s", n.Node, n.Failed, n.Mismatched, n.FirstError)
		}
	}
	r := w.Nodes[2]
	if r.FromPeers != 0 {
		t.Errorf("the rogue node got %d bytes from peers", r.FromPeers)
	}
	if r.FromOrigin == 0 {
		t.Error("the rogue node read nothing from the origin: where did its bytes come from?")
	}
	if r.PeerErrors == 0 {
		t.Error("the rogue node saw no refused peer request: did it ask any?")
	}
	// The others served the rogue node nothing, and each other something
	// (so the per-member counter is there to be read).
	var served float64
	for _, n := range w.Nodes {
		if n.Node == 2 {
			continue
		}
		if b := n.ServedTo[nodeName(2)]; b != 0 {
			t.Errorf("node%d served the rogue node %.0f bytes", n.Node, b)
		}
		for _, b := range n.ServedTo {
			served += b
		}
	}
	if served == 0 {
		t.Error("vmthunder_peer_member_bytes_total{direction=\"served\"} shows nothing served between the cluster's nodes")
	}
}

// Real guests in the wave: three nodes boot the test guest through
// libvirt/QEMU from their exports (the sockets cross from the nodes'
// namespaces to QEMU in the host's) while the fourth replays, all with
// peers; each guest reaches its console marker having read what it must.
func TestWaveQEMUGuests(t *testing.T) {
	l := lab(t)
	w := wave(t, WaveOptions{Mode: Peers, N: testNodes, QEMU: 3, Kill: -1})
	guests := 0
	for _, n := range w.Nodes {
		if n.Failed != 0 || n.Mismatched != 0 {
			t.Errorf("node%d (%s): %d failed, %d wrong: %s", n.Node, n.Kind, n.Failed, n.Mismatched, n.FirstError)
		}
		if n.Kind != "qemu" {
			continue
		}
		guests++
		if n.Bytes != l.o.Image.BootReadBytes {
			t.Errorf("node%d's guest read %d bytes of its files, want %d", n.Node, n.Bytes, l.o.Image.BootReadBytes)
		}
	}
	if guests != 3 {
		t.Fatalf("%d guests booted, want 3", guests)
	}
}
