package peers

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// BenchmarkPeerFetch: one 64 KiB chunk a home holds in its cache, fetched
// over mutual TLS (HTTP/2) by one asker, with 1 or 16 requests in flight.
// The anchor, measured in the same run, is the home reading the chunk from
// its own cache; ratio = fetch time / anchor time per chunk.
func BenchmarkPeerFetch(b *testing.B) {
	const chunk, chunks = 64 << 10, 256
	data := randomBytes(31, chunks*chunk)
	m := manifestOf(b, data, chunk)
	ca := testCA(b)
	home := cluster(b, ca, 1, data, m, clusterOpts{})[0]
	if _, err := home.ref.ReadAt(make([]byte, len(data)), 0); err != nil { // all cached
		b.Fatal(err)
	}
	// The chunks the asker may ask the home for (it is below the home).
	var mine []int64
	for c := range int64(chunks) {
		if Weight("bench-asker", testKey.ID, c) < Weight(home.name, testKey.ID, c) {
			mine = append(mine, c)
		}
	}
	cl := NewClient(identity(b, ca, "bench-asker"), ClientOptions{})
	b.Cleanup(cl.Close)
	anchor := func(n int) time.Duration {
		p := make([]byte, chunk)
		t0 := time.Now()
		for i := range n {
			off, _ := m.Span(mine[i%len(mine)])
			if _, err := home.ref.ReadAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(t0)
	}
	for _, inFlight := range []int{1, 16} {
		b.Run(fmt.Sprintf("inflight=%d", inFlight), func(b *testing.B) {
			b.SetBytes(chunk)
			work := make(chan int64)
			var wg sync.WaitGroup
			for range inFlight {
				wg.Add(1)
				go func() {
					defer wg.Done()
					p := make([]byte, chunk)
					for c := range work {
						if err := cl.Fetch(context.Background(), Peer{home.name, home.addr}, Request{testKey, chunk, c}, p); err != nil {
							b.Error(err)
						}
					}
				}()
			}
			t0 := time.Now()
			for i := 0; b.Loop(); i++ {
				work <- mine[i%len(mine)]
			}
			close(work)
			wg.Wait()
			took := time.Since(t0)
			a := anchor(b.N)
			b.ReportMetric(float64(a.Nanoseconds())/float64(b.N), "anchor-ns/op")
			b.ReportMetric(float64(took)/float64(a), "x-anchor")
		})
	}
}
