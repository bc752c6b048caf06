package peers

import (
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

type noFetch struct{}

func (noFetch) Fetch(context.Context, Peer, Request, []byte) error { return errors.New("no peers") }

// A source with origin_rate reads from its origin at about that rate.
func TestSourceOriginRate(t *testing.T) {
	const size, chunk, limit = 2 << 20, 64 << 10, 4 << 20 // 2 MiB at 4 MiB/s: about 0.5 s
	content := make([]byte, size)
	rand.Read(content)
	origin := memdev.FromBytes(content, true)
	man, err := ComputeManifest(context.Background(), origin, chunk)
	if err != nil {
		t.Fatal(err)
	}
	lim := NewLimiter(limit)
	src, err := NewSource(origin, SourceOptions{Key: BaseKey{ID: "t.g0123456789ab", Template: "t", Generation: "g"}, Manifest: man,
		Members: StaticMembers{Me: "a"}, Fetcher: noFetch{}, OriginLimit: lim})
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, chunk)
	t0 := time.Now()
	for off := int64(0); off < size; off += chunk {
		if _, err := src.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	el := time.Since(t0)
	// The first burst is free; the rest goes at the limit.
	want := time.Duration(float64(size-lim.Burst()) / limit * float64(time.Second))
	t.Logf("%d bytes in %v at %d B/s (expected about %v)", size, el, limit, want)
	if el < want*8/10 || el > want*3+time.Second {
		t.Fatalf("read %d bytes in %v, want about %v", size, el, want)
	}
	if got := src.Stats().BytesFromOrigin.Load(); got != size {
		t.Fatalf("from origin %d", got)
	}
	// Unlimited: no limiter at all.
	if NewLimiter(0) != nil {
		t.Fatal("rate 0 is not unlimited")
	}
}

// GET /v1/trace answers the trace of a base open here as exactly that
// template generation, to a member of the cluster CA only; a server with
// serve_rate sends at about that rate.
func TestServerTrace(t *testing.T) {
	ca := testCA(t)
	key := BaseKey{ID: "t.g0123456789ab", Template: "t", Generation: "g1"}
	trace := []byte("a trace file")
	const limit = 2 << 20
	srv := NewServer("a", ServerOptions{ServeLimit: NewLimiter(limit), Trace: func(k BaseKey) ([]byte, error) {
		if k != key {
			return nil, os.ErrNotExist
		}
		return trace, nil
	}})
	addr := serve(t, srv, identity(t, ca, "a"))
	cl := NewClient(identity(t, ca, "b"), ClientOptions{})
	defer cl.Close()
	peer := Peer{Name: "a", Addr: addr}
	ctx := context.Background()
	if _, err := cl.FetchTrace(ctx, peer, key); err == nil {
		t.Fatal("trace of a base not open there")
	}
	un, err := srv.Register(key, 64<<20, readerFunc(func(p []byte, off int64) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	defer un()
	got, err := cl.FetchTrace(ctx, peer, key)
	if err != nil || string(got) != string(trace) {
		t.Fatalf("%q, %v", got, err)
	}
	other := key
	other.Generation = "g2"
	var fe *FetchError
	if _, err := cl.FetchTrace(ctx, peer, other); !errors.As(err, &fe) || fe.Status != http.StatusNotFound {
		t.Fatalf("another generation: %v", err)
	}
	// A client of another CA gets nothing.
	stranger := NewClient(identity(t, testCA(t), "b"), ClientOptions{Timeout: time.Second})
	defer stranger.Close()
	if _, err := stranger.FetchTrace(ctx, peer, key); err == nil {
		t.Fatal("a client of another CA got the trace")
	}
	// serve_rate: 1 MiB of chunks at 2 MiB/s takes about 0.5 s (less
	// the first burst).
	const chunk = 64 << 10
	req := Request{Base: key, ChunkSize: chunk}
	p := make([]byte, chunk)
	t0 := time.Now()
	for i, n := int64(0), 0; n < 16; i++ {
		if Weight("b", key.ID, i) > Weight("a", key.ID, i) {
			continue // b would be the better home: a refuses
		}
		req.Index, n = i, n+1
		if err := cl.Fetch(ctx, peer, req, p); err != nil {
			t.Fatal(err)
		}
	}
	el := time.Since(t0)
	want := time.Duration(float64(16*chunk-srv.opts.ServeLimit.Burst()) / limit * float64(time.Second))
	t.Logf("1 MiB served in %v (expected about %v)", el, want)
	if el < want*7/10 || el > want*3+time.Second {
		t.Fatalf("served 1 MiB in %v, want about %v", el, want)
	}
}
