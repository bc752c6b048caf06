package peers

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// A manifest written in pieces of any size is the one ComputeManifest
// reads; too few or too many bytes are refused.
func TestManifestWriterMatchesCompute(t *testing.T) {
	const chunk = 4096
	data := randomBytes(7, 37*chunk+1000)
	want, err := ComputeManifest(context.Background(), memdev.FromBytes(data, true), chunk)
	if err != nil {
		t.Fatal(err)
	}
	for _, piece := range []int{1, 333, chunk, chunk + 1, 1 << 20} {
		w, err := NewManifestWriter(int64(len(data)), chunk)
		if err != nil {
			t.Fatal(err)
		}
		for rest := data; len(rest) > 0; {
			n := min(piece, len(rest))
			if k, err := w.Write(rest[:n]); err != nil || k != n {
				t.Fatalf("piece %d: write %d: %d, %v", piece, n, k, err)
			}
			rest = rest[n:]
		}
		got, err := w.Manifest()
		if err != nil || !got.Equal(want) || got.Root() != want.Root() {
			t.Fatalf("piece %d: %v, root %v want %s", piece, err, got, want.Root())
		}
		if _, err := w.Write([]byte{0}); !errors.Is(err, ErrManifest) {
			t.Fatalf("a byte past the end: %v", err)
		}
	}
	w, _ := NewManifestWriter(int64(len(data)), chunk)
	w.Write(data[:len(data)-1])
	if _, err := w.Manifest(); !errors.Is(err, ErrManifest) {
		t.Fatalf("a short write made a manifest: %v", err)
	}
	raw, _ := want.MarshalBinary()
	if n, err := ManifestFileSize(raw[:manifestHeader]); err != nil || n != int64(len(raw)) {
		t.Fatalf("ManifestFileSize: %d, %v; want %d", n, err, len(raw))
	}
	if _, err := ManifestFileSize(append([]byte("VMTMANI0"), raw[8:]...)); !errors.Is(err, ErrManifest) {
		t.Fatalf("a bad header: %v", err)
	}
}

// GET /v1/manifest answers the manifest of a base open here, to members
// of the cluster CA only; the corrupt-manifest fault flips a byte.
func TestServerManifest(t *testing.T) {
	ca := testCA(t)
	key := BaseKey{ID: "t.g0123456789ab", Template: "t", Generation: "g1"}
	man, err := ComputeManifest(context.Background(), memdev.FromBytes(randomBytes(3, 1<<20), true), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := man.MarshalBinary()
	srv := NewServer("a", ServerOptions{Manifest: func(k BaseKey) ([]byte, error) {
		if k != key {
			return nil, os.ErrNotExist
		}
		return raw, nil
	}})
	addr := serve(t, srv, identity(t, ca, "a"))
	cl := NewClient(identity(t, ca, "b"), ClientOptions{})
	defer cl.Close()
	peer := Peer{Name: "a", Addr: addr}
	ctx := context.Background()
	var fe *FetchError
	if _, err := cl.FetchManifest(ctx, peer, key); !errors.As(err, &fe) || fe.Status != http.StatusNotFound {
		t.Fatalf("manifest of a base not open there: %v", err)
	}
	un, err := srv.Register(key, man.Size, readerFunc(func(p []byte, off int64) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	defer un()
	got, err := cl.FetchManifest(ctx, peer, key)
	if err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("%d bytes, %v", len(got), err)
	}
	other := key
	other.Generation = "g2"
	if _, err := cl.FetchManifest(ctx, peer, other); !errors.As(err, &fe) || fe.Status != http.StatusNotFound {
		t.Fatalf("another generation: %v", err)
	}
	stranger := NewClient(identity(t, testCA(t), "b"), ClientOptions{Timeout: time.Second})
	defer stranger.Close()
	if _, err := stranger.FetchManifest(ctx, peer, key); err == nil {
		t.Fatal("a client of another CA got the manifest")
	}
	srv.SetCorruptManifests(true)
	got, err = cl.FetchManifest(ctx, peer, key)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := ParseManifest(got); err != nil || m.Root() == man.Root() {
		t.Fatalf("the fault served a manifest of the right root (%v)", err)
	}
}
