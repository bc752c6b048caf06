// Command benchboot is tests/bench/bench-boot.sh: the boot time of a guest
// from a warm sidecar export against the same guest booting from a local
// raw file that QEMU reads itself, measured in one run, one guest at a
// time, alternating so both see the same load on a shared host. A cold
// boot through the sidecar is set against QEMU reading the iSCSI target
// directly.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/tests/e2e"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

func main() {
	rounds := flag.Int("rounds", 3, "warm boots of each kind (the median is reported)")
	flag.Parse()
	err := run(*rounds)
	testbin.Cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench-boot: %v\n", err)
		os.Exit(1)
	}
}

type bench struct {
	dir string
	img *guestimage.Image
	lab *e2e.Lab
	n   int
	ctx context.Context
}

func (b *bench) boot(kind string, d e2e.Disk) (time.Duration, error) {
	b.n++
	nonce := fmt.Sprintf("%s%d", kind, b.n)
	vm := &e2e.VM{Name: e2e.UniqueName("vmt-bench"), Image: b.img, Disk: d, Nonce: nonce,
		Console: filepath.Join(b.dir, nonce+".console")}
	r, err := b.lab.Boot(b.ctx, vm)
	if err != nil {
		return 0, err
	}
	if r.Bytes != b.img.BootReadBytes {
		return 0, fmt.Errorf("%s boot read %d bytes, want %d", kind, r.Bytes, b.img.BootReadBytes)
	}
	fmt.Printf("  %-26s %6.1f s\n", kind+" boot", r.BootTime.Seconds())
	return r.BootTime, nil
}

func run(rounds int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	rig, err := e2e.NewBenchRig("vmthunder-bench-boot-")
	if err != nil {
		return err
	}
	defer rig.Close()
	dir, img, bin, origin := rig.Dir, rig.Image, rig.Bin, rig.Origin
	lab, err := e2e.Open()
	if err != nil {
		return err
	}
	defer lab.Close()
	node, err := e2e.NewNode(bin, filepath.Join(dir, "node"), origin.URL(), "bench-template", e2e.DaemonOptions{})
	if err != nil {
		return err
	}
	defer node.Close()
	b := &bench{dir: dir, img: img, lab: lab, ctx: ctx}

	// Cold: the first boot through the sidecar fills the cache; the anchor
	// is QEMU reading the target itself.
	ov := filepath.Join(dir, "direct.qcow2")
	if err := e2e.NewISCSIOverlay(ov, "127.0.0.1", origin.Meter.Port(), origin.IQN, origin.LUN, img.Size); err != nil {
		return err
	}
	fmt.Println("boots (one at a time):")
	iscsi, err := b.boot("iscsi-direct", e2e.Disk{ISCSIHost: "127.0.0.1", ISCSIPort: origin.Meter.Port(), ISCSIIQN: origin.IQN, ISCSILUN: origin.LUN, ISCSIOverlay: ov})
	if err != nil {
		return err
	}
	ex, err := node.Export("cold", "cow")
	if err != nil {
		return err
	}
	cold, err := b.boot("sidecar-cold", ex.Disk())
	if err != nil {
		return err
	}
	if err := node.Remove("cold"); err != nil {
		return err
	}

	var warm, local []time.Duration
	for i := 0; i < rounds; i++ {
		id := fmt.Sprintf("warm%d", i)
		ex, err := node.Export(id, "cow")
		if err != nil {
			return err
		}
		w, err := b.boot("sidecar-warm", ex.Disk())
		if err != nil {
			return err
		}
		if err := node.Remove(id); err != nil {
			return err
		}
		// A fresh copy each time: the guest writes its disk.
		raw := filepath.Join(dir, "local.img")
		if out, err := exec.Command("cp", "--sparse=always", img.Root, raw).CombinedOutput(); err != nil {
			return fmt.Errorf("copy image: %v: %s", err, out)
		}
		l, err := b.boot("local-raw-file", e2e.Disk{File: raw})
		if err != nil {
			return err
		}
		warm, local = append(warm, w), append(local, l)
	}

	fmt.Println()
	fmt.Printf("%-40s %10s %10s %8s\n", "test", "ours", "anchor", "ratio")
	row := func(name string, ours, anchor time.Duration) {
		fmt.Printf("%-40s %9.1fs %9.1fs %8.2f\n", name, ours.Seconds(), anchor.Seconds(), ours.Seconds()/anchor.Seconds())
	}
	row(fmt.Sprintf("warm boot, median of %d (vs local raw)", rounds), e2e.Median(warm), e2e.Median(local))
	row("cold boot (vs QEMU iSCSI direct)", cold, iscsi)
	fmt.Println("goal: warm ratio <= 1.10")
	return nil
}
