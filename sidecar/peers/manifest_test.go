package peers

import (
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestManifestComputeVerifyRoundTrip(t *testing.T) {
	const chunk = 4096
	data := randomBytes(1, 10*chunk+123) // a short last chunk
	m, err := ComputeManifest(context.Background(), memdev.FromBytes(data, true), chunk)
	if err != nil {
		t.Fatal(err)
	}
	if m.Chunks() != 11 || m.Size != int64(len(data)) {
		t.Fatalf("chunks %d size %d", m.Chunks(), m.Size)
	}
	for c := range m.Chunks() {
		off, n := m.Span(c)
		p := data[off : off+n]
		if !m.Verify(c, p) {
			t.Fatalf("chunk %d does not verify", c)
		}
		bad := append([]byte(nil), p...)
		bad[len(bad)/2] ^= 1
		if m.Verify(c, bad) {
			t.Fatalf("corrupt chunk %d verifies", c)
		}
		if m.Verify(c, p[:n-1]) || (c+1 < m.Chunks() && m.Verify(c+1, p)) {
			t.Fatalf("chunk %d: a short or misplaced chunk verifies", c)
		}
	}
	if m.Verify(-1, nil) || m.Verify(11, nil) {
		t.Fatal("out of range chunk verifies")
	}

	path := filepath.Join(t.TempDir(), "m", "manifest")
	if err := m.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	got, err := ReadManifestFile(path, m.Root())
	if err != nil || !got.Equal(m) {
		t.Fatalf("read back: %v", err)
	}
	if _, err := ReadManifestFile(path, "sha256:00"); !errors.Is(err, ErrManifest) {
		t.Fatalf("wrong root accepted: %v", err)
	}
}

func TestParseManifestBounds(t *testing.T) {
	m, err := ComputeManifest(context.Background(), memdev.FromBytes(randomBytes(2, 3*4096), true), 4096)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := m.MarshalBinary()
	huge := append([]byte(nil), raw[:manifestHeader]...)
	huge[8] = 0x7f // size 2^62: more chunks than allowed
	for name, b := range map[string][]byte{
		"empty":     nil,
		"magic":     append([]byte("XXXXXXXX"), raw[8:]...),
		"truncated": raw[:len(raw)-1],
		"extra":     append(append([]byte(nil), raw...), 0),
		"huge":      huge,
		"chunk":     func() []byte { b := append([]byte(nil), raw...); b[23] = 1; return b }(),
	} {
		if _, err := ParseManifest(b); !errors.Is(err, ErrManifest) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := ComputeManifest(context.Background(), memdev.New(4096), 1000); !errors.Is(err, ErrManifest) {
		t.Errorf("bad chunk size: %v", err)
	}
}
