// Command demo is `make demo`: the main job on one node. It builds the
// test guest, serves it from a private tgtd as the base LUN, and boots N
// guests through libvirt twice, measuring everything in this run:
//
//   - baseline: each guest boots straight from the target with QEMU's own
//     iSCSI driver (a qcow2 overlay per guest keeps the LUN unwritten);
//   - vmthunder: each guest boots from its own copy-on-write export of
//     the sidecar daemon, all over one shared cache of the base.
//
// The bytes the target sends are counted on the wire by a proxy in front
// of its portal (one per baseline guest, one for the daemon), so neither
// side's own counters are trusted for the headline figures.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/tests/e2e"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

type vmReport struct {
	Name        string  `json:"name"`
	Path        string  `json:"path"` // "vmthunder" or "baseline-iscsi"
	BootSeconds float64 `json:"boot_seconds"`
	GuestRead   int64   `json:"guest_read_bytes"`
	// OriginBytes: baseline, what the target sent to this guest (its own
	// meter); vmthunder, the origin bytes the daemon charges to the export
	// (the chunk fills its reads caused). Absent when the daemon does not
	// report the export's own figure.
	OriginBytes *int64 `json:"origin_bytes,omitempty"`
	// CacheBytes: the daemon's cache_hit_bytes, guest-read bytes served
	// from the cache file (chunks this guest had filled included).
	CacheBytes *int64 `json:"cache_bytes,omitempty"`
	ReadBytes  int64  `json:"export_read_bytes,omitempty"`
	WriteBytes int64  `json:"export_write_bytes,omitempty"`
}

type report struct {
	Started    time.Time `json:"started"`
	VMs        int       `json:"vms"`
	ImageBytes int64     `json:"image_bytes"`
	// BootReadBytes is the file content each guest's init reads.
	BootReadBytes int64  `json:"boot_read_bytes"`
	ChunkSize     string `json:"chunk_size"`

	Baseline []vmReport `json:"baseline"`
	Ours     []vmReport `json:"vmthunder"`

	// Wire bytes the target sent, per phase.
	BaselineTargetBytes int64 `json:"baseline_target_bytes"`
	OursTargetBytes     int64 `json:"vmthunder_target_bytes"`
	// WorkingSetBytes is one boot's working set: the mean bytes the
	// target sent per baseline guest.
	WorkingSetBytes int64 `json:"working_set_bytes"`
	// Ratios to one working set (goal for vmthunder: <= 1.2; baseline ~N).
	OursOverWorkingSet     float64 `json:"vmthunder_over_working_set"`
	BaselineOverWorkingSet float64 `json:"baseline_over_working_set"`
	// Share of the image one boot reads (working set / image size).
	WorkingSetOverImage float64 `json:"working_set_over_image"`
	OursOverBaseline    float64 `json:"vmthunder_over_baseline"`

	MeanBootBaseline float64        `json:"mean_boot_seconds_baseline"`
	MeanBootOurs     float64        `json:"mean_boot_seconds_vmthunder"`
	NodeStats        map[string]any `json:"node_stats,omitempty"`
	// When every export reports the shared base's counters instead of its
	// own, the per-guest split is unknown: these are the base's totals.
	// Host load when each phase began: other work on a shared host skews
	// boot times between the phases (not the byte counts).
	LoadBaseline string `json:"loadavg_at_baseline"`
	LoadOurs     string `json:"loadavg_at_vmthunder"`

	BaseOriginBytes   int64  `json:"base_origin_bytes"`
	BaseCacheHitBytes int64  `json:"base_cache_hit_bytes"`
	StatsNote         string `json:"stats_note,omitempty"`
}

var t0 = time.Now()

func progress(format string, a ...any) {
	fmt.Printf("[%6.1fs] %s\n", time.Since(t0).Seconds(), fmt.Sprintf(format, a...))
}

func main() {
	def := 4
	if v, err := strconv.Atoi(os.Getenv("VMTHUNDER_DEMO_VMS")); err == nil && v > 0 {
		def = v
	}
	n := flag.Int("n", def, "guests per phase (env VMTHUNDER_DEMO_VMS)")
	out := flag.String("report", "demo-report.json", "JSON report path")
	// 32K: the test guest's working set interleaves read and unread files
	// finely, so bigger chunks fetch neighbours no guest reads (256K: about
	// 1.8x the working set from the origin; 64K: 1.3x; 32K: 1.15x).
	defChunk := "32K"
	if v := os.Getenv("VMTHUNDER_DEMO_CHUNK"); v != "" {
		defChunk = v
	}
	chunk := flag.String("chunk-size", defChunk, "cache chunk size for the daemon (env VMTHUNDER_DEMO_CHUNK; empty: the daemon's default)")
	keep := flag.Bool("keep", false, "keep the work directory")
	timeout := flag.Duration("timeout", 15*time.Minute, "give up after this long")
	flag.Parse()
	err := run(*n, *out, *chunk, *keep, *timeout)
	testbin.Cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func run(n int, out, chunk string, keep bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "vmthunder-demo-")
	if err != nil {
		return err
	}
	if err := e2e.MakeShared(dir); err != nil {
		return err
	}
	if keep {
		progress("work directory %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	progress("building the guest image")
	img, err := guestimage.Build(guestimage.Options{Dir: filepath.Join(dir, "image")})
	if err != nil {
		return err
	}
	progress("image %d MiB, %d MiB of data files, a boot reads %.1f MiB of them", img.Size>>20, img.DataBytes>>20, float64(img.BootReadBytes)/(1<<20))
	bin, err := testbin.Vmthunder()
	if err != nil {
		return err
	}
	origin, err := e2e.StartOrigin(img.Root, dir)
	if err != nil {
		return err
	}
	defer origin.Stop()
	progress("tgtd serves the base as %s/%d on %s", origin.IQN, origin.LUN, origin.Portal)
	lab, err := e2e.Open()
	if err != nil {
		return err
	}
	defer lab.Close()

	rep := &report{Started: t0, VMs: n, ImageBytes: img.Size, BootReadBytes: img.BootReadBytes, ChunkSize: chunk}
	if rep.ChunkSize == "" {
		rep.ChunkSize = "daemon default"
	}

	// Baseline: QEMU reads the target itself, one meter per guest.
	progress("baseline: %d guests boot straight from the iSCSI target", n)
	meters := make([]*e2e.Meter, n)
	vms := make([]*e2e.VM, n)
	for i := range vms {
		m, err := e2e.NewMeter(origin.Portal)
		if err != nil {
			return err
		}
		defer m.Close()
		meters[i] = m
		ov := filepath.Join(dir, fmt.Sprintf("baseline-%d.qcow2", i))
		if err := e2e.NewISCSIOverlay(ov, "127.0.0.1", m.Port(), origin.IQN, origin.LUN, img.Size); err != nil {
			return err
		}
		vms[i] = &e2e.VM{Name: e2e.UniqueName(fmt.Sprintf("vmt-demo-base%d", i)), Image: img,
			Nonce: fmt.Sprintf("base%d", i), Console: filepath.Join(dir, fmt.Sprintf("baseline-%d.console", i)),
			Disk: e2e.Disk{ISCSIHost: "127.0.0.1", ISCSIPort: m.Port(), ISCSIIQN: origin.IQN, ISCSILUN: origin.LUN, ISCSIOverlay: ov}}
	}
	rep.LoadBaseline = loadavg()
	res, err := bootAll(ctx, lab, "baseline", vms)
	if err != nil {
		return err
	}
	for i, r := range res {
		sent := meters[i].Sent()
		rep.Baseline = append(rep.Baseline, vmReport{Name: r.Name, Path: "baseline-iscsi", BootSeconds: r.BootTime.Seconds(),
			GuestRead: r.Bytes, OriginBytes: &sent})
		rep.BaselineTargetBytes += meters[i].Sent()
	}

	// VMThunder: one daemon, one cache of the base, a COW export per guest.
	progress("vmthunder: starting the daemon")
	d, err := e2e.StartDaemon(bin, filepath.Join(dir, "node"), e2e.DaemonOptions{ChunkSize: chunk})
	if err != nil {
		return err
	}
	defer d.Close()
	before := origin.Meter.Sent()
	// The template's generation is its image's version: a regenerated
	// image never reuses the cache of an older one.
	st, err := os.Stat(img.Root)
	if err != nil {
		return err
	}
	generation := fmt.Sprintf("%d-%d", st.Size(), st.ModTime().UnixNano())
	exports := make([]*e2e.Export, n)
	for i := range vms {
		id := fmt.Sprintf("demo-vm%d", i)
		ex, err := d.CreateExport(id, origin.URL(), "demo-template", generation, "cow")
		if err != nil {
			return fmt.Errorf("create export %s: %w", id, err)
		}
		exports[i] = ex
		vms[i] = &e2e.VM{Name: e2e.UniqueName(fmt.Sprintf("vmt-demo-vm%d", i)), Image: img,
			Nonce: fmt.Sprintf("vm%d", i), Console: filepath.Join(dir, fmt.Sprintf("vm-%d.console", i)), Disk: ex.Disk()}
	}
	progress("vmthunder: %d copy-on-write exports of base demo-template ready; %d guests boot at once", n, n)
	rep.LoadOurs = loadavg()
	res, err = bootAll(ctx, lab, "vmthunder", vms)
	if err != nil {
		return fmt.Errorf("%w\ndaemon log:\n%s", err, d.LogTail(20))
	}
	rep.OursTargetBytes = origin.Meter.Sent() - before
	stats := make([]e2e.ExportStats, n)
	for i := range res {
		ex, err := d.GetExport(exports[i].ID)
		if err != nil {
			return err
		}
		stats[i] = ex.Stats
	}
	if s, err := d.Stats(); err == nil {
		rep.NodeStats = s
	}
	// Exports of one base that all report the same cache counters, adding
	// up to more than the node fetched, are showing the base's counters.
	var sum int64
	same := true
	for _, st := range stats {
		sum += st.OriginBytes
		same = same && st.OriginBytes == stats[0].OriginBytes && st.CacheHitBytes == stats[0].CacheHitBytes
	}
	nodeOrigin, _ := rep.NodeStats["origin_bytes"].(float64)
	baseWide := n > 1 && same && nodeOrigin > 0 && float64(sum) > nodeOrigin*1.01
	rep.BaseOriginBytes, rep.BaseCacheHitBytes = stats[0].OriginBytes, stats[0].CacheHitBytes
	if baseWide {
		rep.StatsNote = "the daemon reports the shared base's origin/cache counters on every export, so the per-guest split is not known; see base_origin_bytes, base_cache_hit_bytes"
	} else {
		rep.BaseOriginBytes, rep.BaseCacheHitBytes = 0, 0
		for _, st := range stats {
			rep.BaseOriginBytes += st.OriginBytes
			rep.BaseCacheHitBytes += st.CacheHitBytes
		}
	}
	for i, r := range res {
		v := vmReport{Name: r.Name, Path: "vmthunder", BootSeconds: r.BootTime.Seconds(), GuestRead: r.Bytes,
			ReadBytes: stats[i].ReadBytes, WriteBytes: stats[i].WriteBytes}
		if !baseWide {
			o, c := stats[i].OriginBytes, stats[i].CacheHitBytes
			v.OriginBytes, v.CacheBytes = &o, &c
		}
		rep.Ours = append(rep.Ours, v)
	}
	for _, ex := range exports {
		if err := d.DeleteExport(ex.ID); err != nil {
			return err
		}
	}

	rep.WorkingSetBytes = rep.BaselineTargetBytes / int64(n)
	ws := float64(rep.WorkingSetBytes)
	rep.OursOverWorkingSet = float64(rep.OursTargetBytes) / ws
	rep.BaselineOverWorkingSet = float64(rep.BaselineTargetBytes) / ws
	rep.WorkingSetOverImage = ws / float64(img.Size)
	rep.OursOverBaseline = float64(rep.OursTargetBytes) / float64(rep.BaselineTargetBytes)
	rep.MeanBootBaseline = meanBoot(rep.Baseline)
	rep.MeanBootOurs = meanBoot(rep.Ours)
	printTable(rep)
	b, _ := json.MarshalIndent(rep, "", "  ")
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	progress("report written to %s", out)
	if rep.OursOverWorkingSet > 1.2 {
		fmt.Printf("NOTE: vmthunder's origin bytes are %.2fx one boot's working set, above the 1.2x goal\n", rep.OursOverWorkingSet)
	}
	return nil
}

// bootAll boots the guests at once and prints one line per event.
func bootAll(ctx context.Context, lab *e2e.Lab, phase string, vms []*e2e.VM) ([]*e2e.Result, error) {
	res := make([]*e2e.Result, len(vms))
	errs := make([]error, len(vms))
	var wg sync.WaitGroup
	for i, vm := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := lab.BootWith(ctx, vm, func() { progress("%s %s: started", phase, vm.Nonce) })
			res[i], errs[i] = r, err
			if err != nil {
				progress("%s %s: FAILED: %v", phase, vm.Nonce, err)
				return
			}
			progress("%s %s: booted in %.1f s (read %.1f MiB), stopped at %.1f s", phase, vm.Nonce, r.BootTime.Seconds(), float64(r.Bytes)/(1<<20), r.StopTime.Seconds())
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("%s guest %s: %w", phase, vms[i].Nonce, err)
		}
		if res[i].Bytes != vms[i].Image.BootReadBytes {
			return nil, fmt.Errorf("%s guest %s read %d bytes, want %d: console:\n%s", phase, vms[i].Nonce, res[i].Bytes, vms[i].Image.BootReadBytes, res[i].Console)
		}
	}
	return res, nil
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func meanBoot(v []vmReport) float64 {
	s := 0.0
	for _, r := range v {
		s += r.BootSeconds
	}
	return s / float64(len(v))
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func printTable(r *report) {
	fmt.Println()
	fmt.Printf("%d guests per path, cache chunk size %s; from origin: baseline = the target's bytes to that guest on the wire,\n", r.VMs, r.ChunkSize)
	fmt.Printf("vmthunder = chunk fills the daemon charges to that export; from cache = the daemon's cache_hit_bytes\n\n")
	fmt.Printf("%-30s %-15s %8s %14s %14s %14s\n", "VM", "path", "boot s", "from origin", "from cache", "guest read")
	rows := append(append([]vmReport{}, r.Baseline...), r.Ours...)
	sort.SliceStable(rows, func(i, j int) bool { return rows[i].Path < rows[j].Path })
	opt := func(b *int64) string {
		if b == nil {
			return "(base-wide)"
		}
		return mib(*b)
	}
	for _, v := range rows {
		cache := "-"
		if v.Path == "vmthunder" {
			cache = opt(v.CacheBytes)
		}
		fmt.Printf("%-30s %-15s %8.1f %14s %14s %14s\n", v.Name, v.Path, v.BootSeconds, opt(v.OriginBytes), cache, mib(v.GuestRead))
	}
	fmt.Printf("%-30s %-15s %8s %14s %14s %14s\n", fmt.Sprintf("all %d vmthunder guests", r.VMs), "vmthunder", "", mib(r.BaseOriginBytes), mib(r.BaseCacheHitBytes), "")
	if r.StatsNote != "" {
		fmt.Printf("note: %s\n", r.StatsNote)
	}
	fmt.Println()
	fmt.Printf("image %s; one boot's working set (target bytes per baseline guest) %s = %.1f%% of the image\n",
		mib(r.ImageBytes), mib(r.WorkingSetBytes), 100*r.WorkingSetOverImage)
	fmt.Printf("target sent, %d guests: baseline %s (%.2fx working set), vmthunder %s (%.2fx working set, goal <= 1.2x)\n",
		r.VMs, mib(r.BaselineTargetBytes), r.BaselineOverWorkingSet, mib(r.OursTargetBytes), r.OursOverWorkingSet)
	fmt.Printf("vmthunder / baseline origin bytes: %.2f; mean boot: baseline %.1f s, vmthunder %.1f s (host load at start: %s / %s)\n",
		r.OursOverBaseline, r.MeanBootBaseline, r.MeanBootOurs, r.LoadBaseline, r.LoadOurs)
	fmt.Println()
}
