package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/tests/guestimage"
)

func TestScratchNBD(t *testing.T) {
	dir, _ := os.MkdirTemp("", "vmt-e2e-scratch-")
	os.Chmod(dir, 0o755)
	img, err := guestimage.Build(guestimage.Options{Dir: filepath.Join(dir, "img")})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "nbd.sock")
	q := exec.Command("qemu-nbd", "-k", sock, "-f", "raw", "-x", "root", "-s", "-e", "4", "--shared=4", img.Root)
	q.Stderr = os.Stderr
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	defer q.Process.Kill()
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	os.Chmod(sock, 0o666)
	lab, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer lab.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	vm := &VM{Name: UniqueName("vmt-scratch"), Image: img, Nonce: "n1", Console: filepath.Join(dir, "console.log"),
		Disk: Disk{NBDSocket: sock, NBDExport: "root"}}
	res, err := lab.Boot(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", *res)
	t.Log(res.Console)
}
