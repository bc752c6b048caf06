package iscsi_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/sidecar/internal/syncbuf"
	"github.com/vmthunder/vmthunder/sidecar/internal/tgt"
)

func TestMain(m *testing.M) { os.Exit(testbin.Main(m)) }

// vmthunder export iscsi://... serves the LUN byte-exact to clients nobody
// here wrote: nbdcopy and qemu-img compare against the backing file.
func TestExportISCSI(t *testing.T) {
	dir := t.TempDir()
	bin := testbin.VmthunderT(t)
	tg := tgt.Start(t, tgt.Options{Size: 48 << 20, CHAPUser: "exp", CHAPPassword: "export-secret-1"})
	sock := filepath.Join(dir, "nbd.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "export", "--socket", sock, tg.URL(0))
	var log syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 200 {
			t.Fatalf("export socket did not appear:\n%s", log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if strings.Contains(log.String(), "export-secret") {
		t.Fatalf("export logs the CHAP password:\n%s", log.String())
	}
	uri := "nbd+unix:///?socket=" + sock
	out := filepath.Join(dir, "copy.img")
	if o, err := exec.CommandContext(ctx, "nbdcopy", "--requests=32", uri, out).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s\nexport log:\n%s", err, o, log.String())
	}
	got, _ := os.ReadFile(out)
	want, _ := os.ReadFile(tg.BackingFile)
	if !bytes.Equal(got, want) {
		t.Fatalf("nbdcopy of the export (%d bytes) differs from the LUN (%d bytes)", len(got), len(want))
	}
	if o, err := exec.CommandContext(ctx, "qemu-img", "compare", "-f", "raw", "-F", "raw", tg.BackingFile, uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, o)
	}
}
