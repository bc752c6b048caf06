package peers

import (
	"sync"
	"testing"
	"time"
)

// A node's chunk server dies in the middle of a wave (its connections cut,
// nothing listening any more): every other node's reads complete, right,
// with no failed read.
func TestHomeDiesMidWave(t *testing.T) {
	const chunk, chunks = 16 << 10, 96
	data := randomBytes(10, chunks*chunk)
	m := manifestOf(t, data, chunk)
	nodes := cluster(t, testCA(t), 4, data, m, clusterOpts{timeout: 300 * time.Millisecond, attempts: 2})
	for _, nd := range nodes {
		nd.origin.delay = 2 * time.Millisecond // the wave lasts long enough to be cut
	}
	victim := nodes[2]
	var wg sync.WaitGroup
	for _, nd := range nodes {
		if nd == victim {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range int64(chunks) {
				if !nd.readChunk(t, m, data, c) {
					return
				}
			}
		}()
	}
	// Cut it once it has served (under -race the wave starts slowly).
	waitFor(t, "the victim serves", 10*time.Second, func() bool { return victim.srv.Stats().Requests > 0 })
	victim.srv.Close()
	wg.Wait()
	served := victim.srv.Stats().Requests
	var errs uint64
	for _, nd := range nodes {
		errs += nd.src.Stats().PeerErrors.Load()
	}
	t.Logf("the victim served %d chunks before it died; %d peer errors in all", served, errs)
	if served == 0 || errs == 0 {
		t.Fatalf("the fault was not exercised: served %d, errors %d", served, errs)
	}
}
