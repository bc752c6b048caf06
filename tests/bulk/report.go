package bulk

import (
	"math"
	"sort"
)

// Summary is one wave's figures as the bench reports them.
type Summary struct {
	Mode        Mode    `json:"mode"`
	N           int     `json:"nodes"`
	Think       float64 `json:"think_scale"`
	OriginBytes int64   `json:"origin_bytes"`
	OriginLink  int64   `json:"origin_link_bytes"`
	// WorkingSets is OriginBytes over one boot's working set (the origin
	// bytes of one node's boot through the sidecar, measured in the run).
	WorkingSets float64 `json:"origin_working_sets"`
	// Boot times of the replaying nodes, seconds.
	P50, P99, Max float64 `json:"-"`
	P50S          float64 `json:"boot_p50_s"`
	P99S          float64 `json:"boot_p99_s"`
	MaxS          float64 `json:"boot_max_s"`
	// QEMU are the real guests' boot times (start to console marker).
	QEMU       []float64 `json:"qemu_boot_s,omitempty"`
	Failed     int       `json:"failed_reads"`
	Mismatched int       `json:"wrong_reads"`
	FromPeers  uint64    `json:"from_peers_bytes"`
	// DaemonCPU is the daemons' CPU seconds; HostBusy the machine's CPU
	// use during the wave (all nodes share its cores).
	DaemonCPU float64 `json:"daemon_cpu_s"`
	HostBusy  float64 `json:"host_cpu_busy"`
	// PeerFetchMS is the mean time of a successful chunk request to a
	// peer; PeerTimeouts the requests that timed out.
	PeerFetchMS  float64 `json:"peer_fetch_ok_mean_ms"`
	PeerTimeouts float64 `json:"peer_fetch_timeouts"`
	Wave         *Wave   `json:"wave"`
}

// Summarize reduces a wave; workingSet is the anchor of WorkingSets.
func Summarize(w *Wave, think float64, workingSet int64) *Summary {
	s := &Summary{Mode: w.Mode, N: w.N, Think: think, OriginBytes: w.OriginBytes, OriginLink: w.OriginLinkBytes, Wave: w}
	if workingSet > 0 {
		s.WorkingSets = float64(w.OriginBytes) / float64(workingSet)
	}
	var boots []float64
	var fetches, fetchMS float64
	s.HostBusy = w.HostBusy
	for _, n := range w.Nodes {
		s.DaemonCPU += n.CPUSeconds
		s.PeerTimeouts += n.FetchTimeouts
		fetches += n.FetchOK
		fetchMS += n.FetchOK * n.FetchOKMeanMS
		s.Failed += n.Failed
		s.Mismatched += n.Mismatched
		s.FromPeers += n.FromPeers
		if n.Kind == "qemu" {
			s.QEMU = append(s.QEMU, n.BootMS/1000)
			continue
		}
		boots = append(boots, n.BootMS/1000)
	}
	if fetches > 0 {
		s.PeerFetchMS = fetchMS / fetches
	}
	s.P50, s.P99, s.Max = Percentile(boots, 50), Percentile(boots, 99), Percentile(boots, 100)
	s.P50S, s.P99S, s.MaxS = s.P50, s.P99, s.Max
	return s
}

// Percentile is the nearest-rank p-th percentile of v (0 for none).
func Percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	k := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[min(max(k, 0), len(s)-1)]
}
