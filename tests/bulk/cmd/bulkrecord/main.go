// Command bulkrecord records the block-read trace the bulk-boot harness
// replays: the test guest (tests/guestimage, default options) boots once
// through libvirt/QEMU from a cow export of the sidecar daemon, cold, with
// an NBD recording proxy (bulk.Recorder) between QEMU and the export.
//
//	go run ./tests/bulk/cmd/bulkrecord -o tests/bulk/testdata/boot-trace.json.gz
//
// Needs root, tgtd, libvirtd, QEMU (as the e2e tests do).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/tests/bulk"
	"github.com/vmthunder/vmthunder/tests/e2e"
	"github.com/vmthunder/vmthunder/tests/guestimage"
)

func main() {
	out := flag.String("o", "tests/bulk/testdata/boot-trace.json.gz", "trace file to write")
	flag.Parse()
	err := run(*out)
	testbin.Cleanup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bulkrecord: %v\n", err)
		os.Exit(1)
	}
}

func run(out string) error {
	rig, err := e2e.NewBenchRig("vmthunder-bulkrecord-")
	if err != nil {
		return err
	}
	defer rig.Close()
	sum, err := guestimage.FileSHA256(rig.Image.Root)
	if err != nil {
		return err
	}
	d, err := e2e.StartDaemon(rig.Bin, filepath.Join(rig.Dir, "node"), e2e.DaemonOptions{})
	if err != nil {
		return err
	}
	defer d.Close()
	ex, err := d.CreateExport("rec", rig.Origin.URL(), "bulkrec", "1", "cow")
	if err != nil {
		return err
	}
	sock := filepath.Join(rig.Dir, "node", "record.sock")
	rec, err := bulk.NewRecorder(sock, ex.Socket)
	if err != nil {
		return err
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		return err
	}
	lab, err := e2e.Open()
	if err != nil {
		return err
	}
	defer lab.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	vm := &e2e.VM{Name: e2e.UniqueName("vmt-bulkrec"), Image: rig.Image, Nonce: "rec",
		Disk: e2e.Disk{NBDSocket: sock, NBDExport: ex.ExportName}, Console: filepath.Join(rig.Dir, "rec.console")}
	res, err := lab.Boot(ctx, vm)
	if err != nil {
		return err
	}
	rec.Close()
	t, err := rec.Trace(rig.Image.Size, sum, fmt.Sprintf("tests/guestimage default image, cold boot through a cow export of the daemon under QEMU TCG, recorded %s by tests/bulk/cmd/bulkrecord (guest boot %.1f s)",
		time.Now().UTC().Format("2006-01-02"), res.BootTime.Seconds()))
	if err != nil {
		return err
	}
	if err := t.Save(out); err != nil {
		return err
	}
	fmt.Printf("%d reads, %.1f MB, think time %.1f s, guest boot %.1f s -> %s\n", len(t.Reads), float64(t.Bytes())/1e6, t.Think().Seconds(), res.BootTime.Seconds(), out)
	return nil
}
