// Command bulkbench is make bench-bulk (tests/bench/bench-bulk.sh): N
// simulated compute nodes (network namespaces, tc-capped links, one
// `vmthunder daemon` each) boot at once from one template on a tgtd
// origin, in three modes — direct iSCSI (the baseline), the sidecar
// without peers, the sidecar with peers — and it prints, per mode and N,
// the origin's bytes over one boot's working set and the boot time p50,
// p99 and max, side by side, and writes them as JSON. See
// docs/bench-bulk.md.
//
// Environment: NODES (1,8,32), BULK_THINK (1,0: think-time scales of the
// recorded boot; 0 replays its reads back to back), BULK_QEMU (3 nodes
// boot the real guest in the sidecar modes when N > 3, at think scale 1),
// BULK_MODES (all), BULK_REPORT (JSON path), BULK_ORIGIN_MBIT,
// BULK_NODE_MBIT, BULK_DELAY_MS (caps: 200, 1000, 1), BULK_KEEP (keep the
// run's directory: daemon logs, consoles).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/tests/bulk"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

func main() {
	err := run()
	testbin.Cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench-bulk: %v\n", err)
		os.Exit(1)
	}
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func ints(name, def string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(env(name, def), ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%s: %q is not a positive number", name, f)
		}
		out = append(out, n)
	}
	return out, nil
}

type report struct {
	Caps            bulk.Caps       `json:"caps"`
	TraceReads      int             `json:"trace_reads"`
	TraceBytes      int64           `json:"trace_bytes"`
	TraceThinkS     float64         `json:"trace_think_s"`
	WorkingSetBytes int64           `json:"working_set_bytes"`
	Waves           []*bulk.Summary `json:"waves"`
	Goals           []goal          `json:"goals"`
}

type goal struct {
	Think  float64 `json:"think_scale"`
	What   string  `json:"what"`
	Value  float64 `json:"value"`
	Target string  `json:"target"`
	Met    bool    `json:"met"`
}

func run() error {
	nodes, err := ints("NODES", "1,8,32")
	if err != nil {
		return err
	}
	var thinks []float64
	for _, f := range strings.Split(env("BULK_THINK", "1,0"), ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || v < 0 {
			return fmt.Errorf("BULK_THINK: %q", f)
		}
		thinks = append(thinks, v)
	}
	qemu, err := strconv.Atoi(env("BULK_QEMU", "3"))
	if err != nil || qemu < 0 {
		return fmt.Errorf("BULK_QEMU: %q", os.Getenv("BULK_QEMU"))
	}
	var modes []bulk.Mode
	for _, m := range strings.Split(env("BULK_MODES", "direct-iscsi,sidecar,sidecar+peers"), ",") {
		modes = append(modes, bulk.Mode(strings.TrimSpace(m)))
	}
	caps, err := bulk.CapsFromEnv()
	if err != nil {
		return err
	}
	reportPath := env("BULK_REPORT", "bench-bulk-report.json")
	tracePath := env("BULK_TRACE", "tests/bulk/testdata/boot-trace.json.gz")
	trace, err := bulk.LoadTrace(tracePath)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "vmthunder-bench-bulk-")
	if err != nil {
		return err
	}
	if os.Getenv("BULK_KEEP") == "" {
		defer os.RemoveAll(dir)
	} else {
		fmt.Printf("BULK_KEEP: the run's files (daemon logs, consoles) stay in %s\n", dir)
	}
	os.Chmod(dir, 0o755)
	img, err := guestimage.Build(guestimage.Options{Dir: filepath.Join(dir, "image")})
	if err != nil {
		return err
	}
	bin, err := testbin.Vmthunder()
	if err != nil {
		return err
	}
	lab, err := bulk.NewLab(bulk.Options{Bin: bin, Dir: dir, Tag: "bb", MaxNodes: slices.Max(nodes), Caps: caps, Trace: trace, Image: img})
	if err != nil {
		return err
	}
	defer lab.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Hour)
	defer cancel()

	rep := &report{Caps: caps, TraceReads: len(trace.Reads), TraceBytes: trace.Bytes(), TraceThinkS: trace.Think().Seconds()}
	fmt.Printf("caps: origin %d Mbit/s, node %d Mbit/s, %d ms origin delay (relay); trace: %d reads, %.1f MB, %.1f s think time\n",
		caps.OriginMbit, caps.NodeMbit, caps.DelayMS, len(trace.Reads), float64(trace.Bytes())/1e6, trace.Think().Seconds())
	// The anchor of the origin figures, measured here: one node's boot
	// through the sidecar, from an empty cache.
	if err := lab.SetTrace(trace.Short(0, 0)); err != nil {
		return err
	}
	w, err := lab.Run(ctx, bulk.WaveOptions{Mode: bulk.Sidecar, N: 1, Kill: -1})
	if err != nil {
		return err
	}
	rep.WorkingSetBytes = w.OriginBytes
	fmt.Printf("one boot's working set (one node, sidecar, empty cache): %.1f MB from the origin\n\n", float64(w.OriginBytes)/1e6)

	for _, think := range thinks {
		if err := lab.SetTrace(trace.Short(0, think)); err != nil {
			return err
		}
		fmt.Printf("think time x%g (%.1f s a boot on an infinitely fast disk)\n", think, trace.Short(0, think).Think().Seconds())
		fmt.Printf("%5s  %-14s %10s %8s %8s %8s %8s %7s %7s %6s %8s %5s %6s %6s  %s\n", "N", "mode", "origin MB", "/ws", "p50 s", "p99 s", "max s", "failed", "cpu s", "busy", "fetch ms", "t/o", "o drop", "o rtx", "qemu boots s")
		for _, n := range nodes {
			for _, m := range modes {
				q := 0
				if think == 1 {
					q = qemu
				}
				w, err := lab.Run(ctx, bulk.WaveOptions{Mode: m, N: n, QEMU: q, Kill: -1, Verify: true})
				if err != nil {
					return fmt.Errorf("N=%d %s: %w", n, m, err)
				}
				s := bulk.Summarize(w, think, rep.WorkingSetBytes)
				rep.Waves = append(rep.Waves, s)
				var qs []string
				for _, b := range s.QEMU {
					qs = append(qs, fmt.Sprintf("%.1f", b))
				}
				fmt.Printf("%5d  %-14s %10.1f %8.2f %8.2f %8.2f %8.2f %7d %7.1f %5.0f%% %8.1f %5.0f %6d %6d  %s\n", n, m, float64(s.OriginBytes)/1e6, s.WorkingSets, s.P50, s.P99, s.Max,
					s.Failed+s.Mismatched, s.DaemonCPU, 100*s.HostBusy, s.PeerFetchMS, s.PeerTimeouts, w.OriginDrops, w.OriginRetrans, strings.Join(qs, " "))
			}
		}
		rep.Goals = append(rep.Goals, goals(rep.Waves, think, nodes)...)
		fmt.Println()
	}
	fmt.Println("goals (measured, not asserted):")
	for _, g := range rep.Goals {
		met := "missed"
		if g.Met {
			met = "met"
		}
		fmt.Printf("  think x%-4g %-58s %8.2f  (goal %s) %s\n", g.Think, g.What, g.Value, g.Target, met)
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(reportPath, b, 0o644); err != nil {
		return err
	}
	fmt.Printf("report: %s\n", reportPath)
	return nil
}

// goals are issue 14's targets at the largest N against N=1 and the
// baseline, for one think scale.
func goals(all []*bulk.Summary, think float64, nodes []int) []goal {
	find := func(m bulk.Mode, n int) *bulk.Summary {
		for _, s := range all {
			if s.Mode == m && s.N == n && s.Think == think {
				return s
			}
		}
		return nil
	}
	big := slices.Max(nodes)
	var out []goal
	if p := find(bulk.Peers, big); p != nil {
		out = append(out, goal{think, fmt.Sprintf("peers: origin bytes at N=%d / one working set", big), p.WorkingSets, "<= 1.1", p.WorkingSets <= 1.1})
		if one := find(bulk.Peers, 1); one != nil && one.P50 > 0 {
			r := p.P50 / one.P50
			out = append(out, goal{think, fmt.Sprintf("peers: boot p50 at N=%d / N=1", big), r, "<= 1.3", r <= 1.3})
			r = p.Max / one.Max
			out = append(out, goal{think, fmt.Sprintf("peers: boot max at N=%d / N=1", big), r, "<= 1.3", r <= 1.3})
		}
		if d := find(bulk.Direct, big); d != nil && p.P50 > 0 {
			r := d.P50 / p.P50
			out = append(out, goal{think, fmt.Sprintf("direct iSCSI boot p50 / peers boot p50 at N=%d", big), r, ">= 10", r >= 10})
			r = d.Max / p.Max
			out = append(out, goal{think, fmt.Sprintf("direct iSCSI boot max / peers boot max at N=%d", big), r, ">= 10", r >= 10})
		}
	}
	return out
}
