package daemon

import (
	"crypto/rand"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// Node A boots a template and records its trace; node B, which has none,
// opens the same template, fetches A's trace from A over the chunk
// server and replays it.
func TestPeersTraceTravels(t *testing.T) {
	const size = 8 << 20
	content := make([]byte, size)
	rand.Read(content)
	envs, base := peerEnvs(t, 2, content)
	a, b := envs[0], envs[1]
	readAll(t, envs[:1]) // A's boot
	ta, err := a.d.StopTrace(base)
	if err != nil || !ta.Present || ta.Chunks == 0 || ta.FromPeer != "" {
		t.Fatalf("A's trace: %+v, %v", ta, err)
	}
	// B's export closes (it read nothing: no trace stored) and opens again.
	if err := b.d.Delete("vm", false); err != nil {
		t.Fatal(err)
	}
	if _, err := b.d.Trace(base); err == nil {
		t.Fatal("B has a trace before it asked A")
	}
	p := filepath.Join(b.dir, "template.img")
	if _, err := b.d.Create(&api.CreateRequest{ID: "vm", Origin: p, Base: "tmpl", Generation: "gen1", Mode: api.ModeReadOnly}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		tb, err := b.d.Trace(base)
		if err != nil {
			t.Fatal(err)
		}
		if tb.FromPeer != a.d.peers.ml.Self() || tb.Recording || tb.Chunks != ta.Chunks {
			t.Fatalf("B's trace: %+v, want one fetched from %s, not recorded", tb, a.d.peers.ml.Self())
		}
		if !tb.Replaying && tb.PrefetchedChunks > 0 {
			t.Logf("B replayed A's trace: %+v", tb)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B's replay did not finish: %+v", tb)
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := readAll(t, envs[1:])
	if string(got[0]) != string(content) {
		t.Fatal("B read wrong bytes")
	}
}
