package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/peers"
)

// collector reads the daemon's state at each scrape: exports, caches and
// warm-ups. The request path's own series live in the metrics layer.
type collector struct{ d *Daemon }

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("vmthunder_"+name, help, labels, nil)
}

var (
	dUp           = desc("up", "1 while the daemon answers; build information in the labels.", "version")
	dExports      = desc("exports", "Exports in the table, by mode and state.", "mode", "state")
	dSourceBytes  = desc("read_bytes_total", "Bytes read into or through the base cache, by source (cache: guest reads served from the cache file; origin: chunks fetched from the origin).", "base", "source")
	dCacheReads   = desc("cache_reads_total", "Guest read requests at the base cache, by result (hit: served from the cache file; miss: needed a fill).", "base", "result")
	dFills        = desc("cache_fills_total", "Chunks fetched from the source into the cache.", "base")
	dWriteThrough = desc("write_through_bytes_total", "Bytes written through the cache to the origin.", "base")
	dInval        = desc("cache_invalidations_total", "Cached chunks dropped because the origin changed under them.", "base")
	dPresent      = desc("cache_present_bytes", "Bytes of the base present in the cache.", "base")
	dBaseSize     = desc("cache_base_size_bytes", "Size of the base.", "base")
	dFillRatio    = desc("cache_fill_ratio", "Share of the base present in the cache (0..1).", "base")
	dDegraded     = desc("cache_degraded", "1 when a sync failed and the cache is bypassed.", "base")
	dDisk         = desc("cache_disk_bytes", "Disk space used by every base cache in the cache directory.")
	dBudget       = desc("cache_budget_bytes", "The cache's size budget (0: none).")
	dBases        = desc("bases", "Base caches in the cache directory, by state (open: used by an export or a warm-up).", "state")
	dCOW          = desc("cow_bytes", "Bytes of an export held in its copy-on-write store.", "export")
	dWarmDone     = desc("warm_done_bytes", "Bytes of the base's current or last warm-up done.", "base")
	dWarmTotal    = desc("warm_total_bytes", "Bytes the base's current or last warm-up copies.", "base")
	dWarmRunning  = desc("warm_running", "1 while a warm-up of the base runs.", "base")

	dPrefetched  = desc("prefetch_chunks_total", "Chunks the boot-trace replay fetched ahead of the guest.", "base")
	dPrefBytes   = desc("prefetch_bytes_total", "Bytes the boot-trace replay fetched ahead of the guest.", "base")
	dPrefHits    = desc("prefetch_hit_chunks_total", "Prefetched chunks a guest then read.", "base")
	dPrefWasted  = desc("prefetch_wasted_bytes_total", "Prefetched bytes no guest read before the base's last export closed.", "base")
	dPrefSkipped = desc("prefetch_skipped_chunks_total", "Trace chunks the replay found already in the cache.", "base")
	dRecording   = desc("trace_recording", "1 while a boot trace of the base is being recorded.", "base")
	dReplaying   = desc("prefetch_replaying", "1 while the base's boot trace is being replayed.", "base")

	dPeerBytes        = desc("peer_read_bytes_total", "Bytes of a template base's chunks this node read, by source (origin: its own origin; peers: other nodes, verified).", "base", "source")
	dPeerServed       = desc("peer_served_bytes_total", "Bytes of a template base's chunks this node served to peers.", "base")
	dPeerCorrupt      = desc("peer_corrupt_chunks_total", "Chunks from peers that failed verification against the base's manifest and were dropped.", "base")
	dPeerBadManifests = desc("peer_corrupt_manifests_total", "Manifests from peers refused: not the root the template's Cinder metadata names, or malformed.", "base")
	dPeerErrors       = desc("peer_errors_total", "Chunk requests to peers that failed (timeout, refused, error).", "base")
	dPeerHedges       = desc("peer_hedges_total", "Chunk requests to peers asked again because the first was slow, by result (sent: hedges sent; won: chunks a hedge answered first; not_held: cached-only hedges the member could not answer).", "base", "result")
	dPeerHedgeWaste   = desc("peer_hedge_waste_bytes_total", "Verified chunk bytes from peers that arrived after another request had answered the chunk.", "base")
	dPeerMembers      = desc("peer_members", "Members of the peers cluster as this node sees it (this node included), by state (alive, suspect, dead, left; dead and left ones until forgotten).", "state")
	// Per member: bounded by the cluster's size, since a member is dropped
	// once membership forgets it (5 minutes after it died or left).
	dPeerMemberBytes = desc("peer_member_bytes_total", "Chunk bytes exchanged with one member, by direction (received: read from it, verified; served: sent to it).", "peer", "direction")
	dPeerFetch       = desc("peer_fetch_duration_seconds", "Time of a chunk request to a peer, by outcome (ok; timeout; error: refused, unreachable or an error answer; corrupt: failed verification).", "outcome")
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dUp, dExports, dSourceBytes, dCacheReads, dFills, dWriteThrough, dInval,
		dPresent, dBaseSize, dFillRatio, dDegraded, dDisk, dBudget, dBases, dCOW, dWarmDone, dWarmTotal, dWarmRunning,
		dPrefetched, dPrefBytes, dPrefHits, dPrefWasted, dPrefSkipped, dRecording, dReplaying,
		dPeerBytes, dPeerServed, dPeerCorrupt, dPeerBadManifests, dPeerErrors, dPeerHedges, dPeerHedgeWaste, dPeerMembers, dPeerMemberBytes, dPeerFetch} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	g := func(desc *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, lv...)
	}
	ctr := func(desc *prometheus.Desc, v uint64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), lv...)
	}
	g(dUp, 1, Version)

	open := d.openBases()
	for id, r := range open {
		s := r.Stats()
		ctr(dSourceBytes, s.BytesFromCache, id, "cache")
		ctr(dSourceBytes, s.BytesFromSource, id, "origin")
		ctr(dCacheReads, s.Hits, id, "hit")
		ctr(dCacheReads, s.Misses, id, "miss")
		ctr(dFills, s.Fills, id)
		ctr(dWriteThrough, s.WriteThrough, id)
		ctr(dInval, s.Invalidations, id)
		g(dPresent, float64(s.BytesPresent), id)
		g(dBaseSize, float64(s.Size), id)
		ratio := 0.0
		if s.Size > 0 {
			ratio = float64(s.BytesPresent) / float64(s.Size)
		}
		g(dFillRatio, ratio, id)
		deg := 0.0
		if s.Degraded {
			deg = 1
		}
		g(dDegraded, deg, id)
	}
	pf := d.pf.All()
	for id := range open {
		if _, ok := pf[id]; !ok {
			pf[id] = d.pf.Stats(id) // zero: present, so rate() sees the base from its start
		}
	}
	b01 := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	for id, s := range pf {
		ctr(dPrefetched, s.Prefetched, id)
		ctr(dPrefBytes, s.PrefetchedBytes, id)
		ctr(dPrefHits, s.Hits, id)
		ctr(dPrefWasted, s.WastedBytes, id)
		ctr(dPrefSkipped, s.Skipped, id)
		g(dRecording, b01(s.Recording), id)
		g(dReplaying, b01(s.Replaying), id)
	}
	if infos, err := d.mgr.List(); err == nil {
		var disk int64
		for _, inf := range infos {
			disk += inf.BytesOnDisk
		}
		g(dDisk, float64(disk))
		g(dBases, float64(len(open)), "open")
		g(dBases, float64(max(len(infos)-len(open), 0)), "idle")
	}
	g(dBudget, float64(d.cfg.CacheBudget))
	if p := d.peers; p != nil { // peers.go
		states := map[string]int{}
		for _, s := range peers.States {
			states[s] = 0 // present at zero
		}
		for _, m := range p.ml.Members() {
			states[m.State]++
		}
		for s, n := range states {
			g(dPeerMembers, float64(n), s)
		}
		for name, b := range p.traffic.Members() {
			if !p.ml.Knows(name) { // asked before gossip showed it, or just forgotten
				continue
			}
			ctr(dPeerMemberBytes, b.Received, name, "received")
			ctr(dPeerMemberBytes, b.Served, name, "served")
		}
		for outcome, h := range p.traffic.Fetches() {
			ch <- prometheus.MustNewConstHistogram(dPeerFetch, h.Count, h.Sum, h.Buckets, outcome)
		}
		p.mu.Lock()
		for id, s := range p.stats {
			ctr(dPeerBytes, s.src.BytesFromOrigin.Load(), id, "origin")
			ctr(dPeerBytes, s.src.BytesFromPeers.Load(), id, "peers")
			ctr(dPeerServed, s.served.Load(), id)
			ctr(dPeerCorrupt, s.src.CorruptChunks.Load(), id)
			ctr(dPeerBadManifests, s.corruptManifests.Load(), id)
			ctr(dPeerErrors, s.src.PeerErrors.Load(), id)
			ctr(dPeerHedges, s.src.Hedges.Load(), id, "sent")
			ctr(dPeerHedges, s.src.HedgeWins.Load(), id, "won")
			ctr(dPeerHedges, s.src.NotHeld.Load(), id, "not_held")
			ctr(dPeerHedgeWaste, s.src.HedgeWasteBytes.Load(), id)
		}
		p.mu.Unlock()
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	type ms struct{ mode, state string }
	counts := map[ms]int{}
	for _, m := range api.Modes {
		for _, s := range []string{stateReady, stateError} {
			counts[ms{m, s}] = 0 // present at zero, so rate() and alerts see them
		}
	}
	for _, e := range d.exports {
		if e.state == stateCreating {
			continue
		}
		counts[ms{e.rec.Mode, e.state}]++
		if e.dev != nil && e.dev.COW() != nil {
			cs := e.dev.COW().Stats()
			g(dCOW, float64(cs.ClustersPresent*cs.ClusterSize), e.rec.ID)
		}
	}
	for k, n := range counts {
		g(dExports, float64(n), k.mode, k.state)
	}
	for id, j := range d.warms {
		g(dWarmDone, float64(j.status.DoneBytes), id)
		g(dWarmTotal, float64(j.status.TotalBytes), id)
		run := 0.0
		if j.status.State == "running" {
			run = 1
		}
		g(dWarmRunning, run, id)
	}
}
