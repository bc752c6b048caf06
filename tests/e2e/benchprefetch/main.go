// Command benchprefetch is tests/bench/bench-prefetch.sh: a real QEMU
// guest's cold boot through the sidecar daemon with the origin behind a
// link capped by tc (tbf at -mbit, netem 1 ms delay) in a network
// namespace, without a boot trace and with one, beside a warm boot (the
// cache holds the working set) and the transfer limit (the bytes the cold
// boot fetched / the link's rate). The daemon runs inside the namespace;
// tgtd stays outside, reached through a TCP relay on the veth, so every
// byte of the origin crosses the shaped link. Needs root.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
	"github.com/vmthunder/vmthunder/tests/e2e"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

func main() {
	rounds := flag.Int("rounds", 3, "boots of each kind per rate (the median is reported)")
	rates := flag.String("mbit", "25,100", "link rates to measure, Mbit/s")
	flag.Parse()
	err := run(*rounds, strings.Split(*rates, ","))
	testbin.Cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench-prefetch: %v\n", err)
		os.Exit(1)
	}
}

const (
	ns     = "vmtpf"
	vethH  = "vmtpf0" // host side: tc shapes what it sends (target -> daemon)
	vethN  = "vmtpf1"
	hostIP = "10.231.7.1"
	nsIP   = "10.231.7.2"
)

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func setupNetns() error {
	exec.Command("ip", "netns", "del", ns).Run()
	for _, c := range [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "link", "add", vethH, "type", "veth", "peer", "name", vethN},
		{"ip", "link", "set", vethN, "netns", ns},
		{"ip", "addr", "add", hostIP + "/30", "dev", vethH},
		{"ip", "link", "set", vethH, "up"},
		{"ip", "netns", "exec", ns, "ip", "addr", "add", nsIP + "/30", "dev", vethN},
		{"ip", "netns", "exec", ns, "ip", "link", "set", vethN, "up"},
		{"ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"},
	} {
		if err := sh(c...); err != nil {
			return err
		}
	}
	return nil
}

func teardownNetns() {
	exec.Command("ip", "link", "del", vethH).Run()
	exec.Command("ip", "netns", "del", ns).Run()
}

// shape caps the host -> namespace direction at mbit with 1 ms delay.
func shape(mbit int) error {
	exec.Command("tc", "qdisc", "del", "dev", vethH, "root").Run()
	if err := sh("tc", "qdisc", "add", "dev", vethH, "root", "handle", "1:", "tbf",
		"rate", fmt.Sprintf("%dmbit", mbit), "burst", "32kb", "latency", "200ms"); err != nil {
		return err
	}
	// netem delays the same queue when the kernel has it; without it
	// (sch_netem is not built on every kernel) the relay's delay line does.
	relayDelay = 0
	if sh("tc", "qdisc", "add", "dev", vethH, "parent", "1:1", "handle", "10:", "netem", "delay", "1ms", "limit", "10000") != nil {
		relayDelay = time.Millisecond
	}
	return nil
}

// relayDelay is the delay the relay adds to what the target sends.
var relayDelay time.Duration

// relay forwards connections on hostIP to the target and counts what the
// target sends.
type relay struct {
	ln   net.Listener
	sent atomic.Int64
}

func newRelay(target string) (*relay, error) {
	ln, err := net.Listen("tcp", hostIP+":0")
	if err != nil {
		return nil, err
	}
	r := &relay{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(t, c); t.Close(); c.Close() }()
			go func() { e2e.DelayCopy(c, t, relayDelay, &r.sent); c.Close(); t.Close() }()
		}
	}()
	return r, nil
}

type bench struct {
	dir    string
	img    *guestimage.Image
	lab    *e2e.Lab
	d      *e2e.Daemon
	api    *client.Client
	origin string
	base   string // the template base's id, from the first export
	n      int
	ctx    context.Context
}

func (b *bench) boot(kind string) (time.Duration, error) {
	b.n++
	id := fmt.Sprintf("b%d", b.n)
	ex, err := b.d.CreateExport(id, b.origin, "pf", "1", "cow")
	if err != nil {
		return 0, err
	}
	b.base = ex.Base
	vm := &e2e.VM{Name: e2e.UniqueName("vmt-pf"), Image: b.img, Disk: ex.Disk(), Nonce: id,
		Console: filepath.Join(b.dir, id+".console")}
	r, err := b.lab.Boot(b.ctx, vm)
	if err == nil && r.Bytes != b.img.BootReadBytes {
		err = fmt.Errorf("%s boot read %d bytes, want %d", kind, r.Bytes, b.img.BootReadBytes)
	}
	if derr := b.d.DeleteExport(id); err == nil {
		err = derr
	}
	if err != nil {
		return 0, err
	}
	fmt.Printf("  %-28s %6.1f s\n", kind, r.BootTime.Seconds())
	return r.BootTime, nil
}

// dropBase removes the base's cache (and with it its trace).
func (b *bench) dropBase() error {
	if b.base == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	return b.api.DeleteBase(ctx, b.base)
}

func run(rounds int, rates []string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespace, tc, libvirtd)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	rig, err := e2e.NewBenchRig("vmthunder-bench-prefetch-")
	if err != nil {
		return err
	}
	defer rig.Close()
	dir, img, bin, origin := rig.Dir, rig.Image, rig.Bin, rig.Origin
	if err := setupNetns(); err != nil {
		return err
	}
	defer teardownNetns()
	rl, err := newRelay(origin.Portal)
	if err != nil {
		return err
	}
	defer rl.ln.Close()
	// The daemon runs in the namespace; its unix sockets are the host's.
	wrap := filepath.Join(dir, "vmthunder-in-ns")
	if err := os.WriteFile(wrap, []byte(fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", ns, bin)), 0o755); err != nil {
		return err
	}
	lab, err := e2e.Open()
	if err != nil {
		return err
	}
	defer lab.Close()
	d, err := e2e.StartDaemon(wrap, filepath.Join(dir, "node"), e2e.DaemonOptions{})
	if err != nil {
		return err
	}
	defer d.Close()
	b := &bench{dir: dir, img: img, lab: lab, d: d, api: client.New(d.API), ctx: ctx,
		origin: fmt.Sprintf("iscsi://%s/%s/%d", rl.ln.Addr(), origin.IQN, origin.LUN)}

	type result struct {
		mbit                   int
		cold, trace, warm, lim []time.Duration
	}
	var results []result
	for _, r := range rates {
		var mbit int
		if _, err := fmt.Sscan(r, &mbit); err != nil || mbit <= 0 {
			return fmt.Errorf("bad rate %q", r)
		}
		if err := shape(mbit); err != nil {
			return err
		}
		how := "netem"
		if relayDelay > 0 {
			how = "the relay (no sch_netem in this kernel)"
		}
		fmt.Printf("origin link %d Mbit/s (tc tbf), 1 ms delay by %s; boots one at a time:\n", mbit, how)
		res := result{mbit: mbit}
		for i := 0; i < rounds; i++ {
			// Cold, no trace: the cache and its trace are gone. This boot
			// records the trace the next one replays.
			if err := b.dropBase(); err != nil {
				return err
			}
			sent0 := rl.sent.Load()
			cold, err := b.boot("cold, no trace")
			if err != nil {
				return err
			}
			ws := rl.sent.Load() - sent0
			c, cancel := context.WithTimeout(ctx, time.Minute)
			raw, err := b.api.ExportTrace(c, b.base)
			cancel()
			if err != nil {
				return fmt.Errorf("the cold boot left no trace: %w", err)
			}
			// Cold with the trace: an empty cache, the trace imported.
			if err := b.dropBase(); err != nil {
				return err
			}
			c, cancel = context.WithTimeout(ctx, time.Minute)
			_, err = b.api.ImportTrace(c, b.base, raw)
			cancel()
			if err != nil {
				return err
			}
			withTrace, err := b.boot("cold, trace replayed")
			if err != nil {
				return err
			}
			c, cancel = context.WithTimeout(ctx, time.Minute)
			tr, err := b.api.Trace(c, b.base)
			cancel()
			if err == nil {
				fmt.Printf("  %-28s %d chunks prefetched, %d read by the guest, %d bytes wasted, backed off %v\n",
					"replay", tr.PrefetchedChunks, tr.HitChunks, tr.WastedBytes, tr.BackedOff)
			}
			warm, err := b.boot("warm (cache full)")
			if err != nil {
				return err
			}
			lim := time.Duration(float64(ws) * 8 / float64(mbit*1e6) * float64(time.Second))
			fmt.Printf("  %-28s %6.1f s (%.1f MB fetched by the cold boot)\n", "transfer limit", lim.Seconds(), float64(ws)/1e6)
			res.cold, res.trace = append(res.cold, cold), append(res.trace, withTrace)
			res.warm, res.lim = append(res.warm, warm), append(res.lim, lim)
		}
		results = append(results, res)
	}
	exec.Command("tc", "qdisc", "del", "dev", vethH, "root").Run()

	fmt.Println()
	fmt.Printf("%-46s %10s %10s %8s\n", "test (medians)", "ours", "anchor", "ratio")
	row := func(name string, ours, anchor time.Duration) {
		fmt.Printf("%-46s %9.1fs %9.1fs %8.2f\n", name, ours.Seconds(), anchor.Seconds(), ours.Seconds()/anchor.Seconds())
	}
	for _, r := range results {
		anchor := max(e2e.Median(r.warm), e2e.Median(r.lim))
		fmt.Printf("%d Mbit/s: warm boot %.1f s, transfer limit %.1f s; anchor = the larger\n", r.mbit, e2e.Median(r.warm).Seconds(), e2e.Median(r.lim).Seconds())
		row(fmt.Sprintf("%d Mbit/s cold boot, trace replayed", r.mbit), e2e.Median(r.trace), anchor)
		row(fmt.Sprintf("%d Mbit/s cold boot, no trace", r.mbit), e2e.Median(r.cold), anchor)
	}
	fmt.Println("goal: cold boot with the trace <= 1.15x max(warm boot, working set / bandwidth)")
	return nil
}
