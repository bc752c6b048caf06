package nbd

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// asyncDev is a memdev with an asynchronous read path that holds reads
// until Unplug and then finishes them out of order, like the iSCSI origin.
// Reads past failAt fail.
type asyncDev struct {
	*memdev.Dev
	failAt  int64
	mu      sync.Mutex
	held    []func()
	started atomic.Int64
}

func (d *asyncDev) ReadAtAsync(p []byte, off int64, done func(error)) {
	d.started.Add(1)
	d.mu.Lock()
	d.held = append(d.held, func() {
		time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
		if off+int64(len(p)) > d.failAt {
			done(errors.New("injected media error"))
			return
		}
		_, err := d.Dev.ReadAt(p, off)
		done(err)
	})
	d.mu.Unlock()
}

func (d *asyncDev) Unplug() {
	d.mu.Lock()
	held := d.held
	d.held = nil
	d.mu.Unlock()
	for _, f := range held {
		go f()
	}
}

// wrapped passes everything to the device below, as stack.Export does.
type wrapped struct{ blockdev.Device }

func (w wrapped) Unwrap() blockdev.Device { return w.Device }

func runWithin(t *testing.T, d time.Duration, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s did not finish in %v (a read held and never sent?)\n%s", name, d, out)
	}
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestAsyncReadsThroughAWrapperAreExact(t *testing.T) {
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	dev := &asyncDev{Dev: memdev.FromBytes(data, true), failAt: 1 << 62}
	sock := serveDevs(t, map[string]blockdev.Device{"": wrapped{dev}})
	out := filepath.Join(t.TempDir(), "copy.img")
	// nbdcopy keeps many reads of mixed sizes in flight on several connections.
	runWithin(t, time.Minute, "nbdcopy", "--requests=32", "--request-size=65536", uri(sock, ""), out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(data) {
		t.Fatal("nbdcopy through the asynchronous path differs from the device")
	}
	runWithin(t, time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri(sock, ""))
	if dev.started.Load() == 0 {
		t.Fatal("the server never used the asynchronous read path")
	}
	// 4 KiB random reads at queue depth 32 with fio's own checks.
	runWithin(t, time.Minute, "fio", "--name=r", "--ioengine=nbd", "--uri="+uri(sock, ""), "--rw=randread",
		"--bs=4k", "--iodepth=32", "--number_ios=4096", "--size=16m")
}

func TestAsyncReadErrorReachesClient(t *testing.T) {
	dev := &asyncDev{Dev: memdev.New(4 << 20), failAt: 1 << 20}
	sock := serveDevs(t, map[string]blockdev.Device{"": dev})
	out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "read 2M 4k", "-c", "read 4k 4k", uri(sock, "")).CombinedOutput()
	if !strings.Contains(string(out), "read failed: Input/output error") {
		t.Fatalf("read error not reported:\n%s", out)
	}
	if strings.Count(string(out), "read 4096/4096 bytes") != 2 {
		t.Fatalf("reads around the failure did not succeed:\n%s", out)
	}
	if dev.started.Load() != 3 {
		t.Fatalf("%d reads took the asynchronous path, want 3", dev.started.Load())
	}
}
