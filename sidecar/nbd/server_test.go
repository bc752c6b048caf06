package nbd

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/delay"
	"github.com/vmthunder/vmthunder/sidecar/origin/file"
)

// serveDevs starts an in-process server with the given exports on a unix
// socket and returns the socket path.
func serveDevs(t *testing.T, exports map[string]blockdev.Device) string {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	srv := NewServer(log)
	for name, dev := range exports {
		if err := srv.Add(name, dev); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func uri(sock, name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func mustFail(t *testing.T, want string, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("%s %s succeeded, want failure\n%s", name, strings.Join(args, " "), out)
	}
	if !strings.Contains(string(out), want) {
		t.Fatalf("%s: output lacks %q:\n%s", name, want, out)
	}
	return string(out)
}

// sparseFile makes a 32 MiB file with random data only in [8M, 12M).
func sparseFile(t *testing.T) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	data := make([]byte, 32<<20)
	rand.Read(data[8<<20 : 12<<20])
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(int64(len(data)))
	f.WriteAt(data[8<<20:12<<20], 8<<20)
	f.Close()
	return path, data
}

func openFile(t *testing.T, path string, ro bool) *file.Dev {
	t.Helper()
	d, err := file.Open(path, ro)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestNbdinfoFlagsAndMap(t *testing.T) {
	path, _ := sparseFile(t)
	sock := serveDevs(t, map[string]blockdev.Device{
		"":   openFile(t, path, false),
		"ro": openFile(t, path, true),
	})
	out := run(t, "nbdinfo", uri(sock, ""))
	for _, want := range []string{"export-size: 33554432", "base:allocation", "can_flush: true", "can_fua: true",
		"can_trim: true", "can_zero: true", "can_multi_conn: true", "can_cache: true", "is_read_only: false",
		"block_size_preferred: 4096"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo lacks %q:\n%s", want, out)
		}
	}
	ro := run(t, "nbdinfo", uri(sock, "ro"))
	for _, want := range []string{"is_read_only: true", "can_trim: false", "can_zero: false"} {
		if !strings.Contains(ro, want) {
			t.Errorf("read-only nbdinfo lacks %q:\n%s", want, ro)
		}
	}
	list := run(t, "nbdinfo", "--list", uri(sock, ""))
	if !strings.Contains(list, `export="ro"`) {
		t.Errorf("nbdinfo --list lacks the ro export:\n%s", list)
	}
	m := run(t, "nbdinfo", "--map", uri(sock, ""))
	fields := strings.Fields(m)
	// Three runs: hole 0-8M, data 8M-12M, hole 12M-32M.
	want := []string{"0", "8388608", "3", "hole,zero", "8388608", "4194304", "0", "data", "12582912", "20971520", "3", "hole,zero"}
	if strings.Join(fields, " ") != strings.Join(want, " ") {
		t.Errorf("nbdinfo --map = %q, want %q", fields, want)
	}
}

func TestNbdcopyRoundTripAndQemuCompare(t *testing.T) {
	path, data := sparseFile(t)
	dst := filepath.Join(t.TempDir(), "dst.img")
	if err := os.WriteFile(dst, make([]byte, len(data)), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := serveDevs(t, map[string]blockdev.Device{"src": openFile(t, path, true), "dst": openFile(t, dst, false)})
	out := filepath.Join(t.TempDir(), "out.img")
	run(t, "nbdcopy", uri(sock, "src"), out)
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy out of the export differs from the source")
	}
	// Into a writable export, then compare with qemu-img.
	run(t, "nbdcopy", "--flush", path, uri(sock, "dst"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", path, uri(sock, "dst"))
	got, _ = os.ReadFile(dst)
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy into the export did not land byte for byte")
	}
}

func TestQemuIOWriteFlushDiscardZero(t *testing.T) {
	dev := memdev.New(16 << 20)
	sock := serveDevs(t, map[string]blockdev.Device{"": dev})
	u := uri(sock, "")
	run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -P 0xcd -f 2M 64k", // FUA
		"-c", "flush",
		"-c", "write -P 0xee 4M 1M",
		"-c", "discard 4M 64k",
		"-c", "write -P 0x11 6M 128k",
		"-c", "write -z 6M 64k", u)
	out := run(t, "qemu-io", "-f", "raw",
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0xcd 2M 64k",
		"-c", "read -P 0 4M 64k",
		"-c", "read -P 0xee 4259840 960k",
		"-c", "read -P 0 6M 64k",
		"-c", "read -P 0x11 6356992 64k", u)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io read back wrong data:\n%s", out)
	}
	b := dev.Bytes()
	if b[0] != 0xab || b[2<<20] != 0xcd || b[4<<20] != 0 || b[6<<20] != 0 || b[6<<20+64<<10] != 0x11 {
		t.Fatal("device contents do not match what qemu-io wrote")
	}
}

func TestFioVerify(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"": memdev.New(64 << 20)})
	out := run(t, "fio", "--name=v", "--ioengine=nbd", "--uri="+uri(sock, ""), "--rw=randwrite",
		"--bs=4k", "--iodepth=32", "--size=32m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
		"--verify_state_save=0", "--directory="+t.TempDir())
	if !strings.Contains(out, "err= 0") {
		t.Fatalf("fio verify did not report err=0:\n%s", out)
	}
}

// failing fails every read past 1 MiB.
type failing struct{ *memdev.Dev }

func (f failing) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > 1<<20 {
		return 0, errors.New("injected media error")
	}
	return f.Dev.ReadAt(p, off)
}

func TestReadErrorReachesClient(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"": failing{memdev.New(4 << 20)}})
	out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "read 2M 4k", "-c", "read 4k 4k", uri(sock, "")).CombinedOutput()
	// qemu-io reports the failed read and goes on: the stream stays in step.
	if !strings.Contains(string(out), "read failed: Input/output error") {
		t.Fatalf("read error not reported:\n%s", out)
	}
	if strings.Count(string(out), "read 4096/4096 bytes") != 2 {
		t.Fatalf("reads around the failure did not succeed:\n%s", out)
	}
}

func TestReadOnlyAndUnknownExport(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"ro": memdev.FromBytes(make([]byte, 1<<20), true)})
	// QEMU sees the READ_ONLY flag and refuses to open for writing.
	mustFail(t, "Permission denied", "qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock, "ro"))
	run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", uri(sock, "ro"))
	mustFail(t, "nope", "nbdinfo", uri(sock, "nope"))
}

func TestRequestsOnOneConnectionOverlap(t *testing.T) {
	const lat = 20 * time.Millisecond
	sock := serveDevs(t, map[string]blockdev.Device{"": delay.New(memdev.New(16<<20), lat, 0)})
	start := time.Now()
	// 256 reads at queue depth 32 over one connection: serially that is
	// 256*20ms = 5.1 s; overlapped about 8*20ms.
	run(t, "fio", "--name=qd", "--ioengine=nbd", "--uri="+uri(sock, ""), "--rw=randread", "--bs=4k",
		"--iodepth=32", "--number_ios=256", "--size=16m")
	if el := time.Since(start); el > 256*lat/4 {
		t.Fatalf("256 reads at QD32 with %v latency took %v: requests are not served concurrently", lat, el)
	}
}

func TestRemoveWaitsForInFlightRequests(t *testing.T) {
	const lat = 300 * time.Millisecond
	srv := NewServer(logrus.New())
	dev := memdev.New(1 << 20)
	copy(dev.Bytes(), "data")
	if err := srv.Add("a", delay.New(dev, lat, 0)); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	defer srv.Close()
	c := dialRaw(t, sock, "a")
	c.send(cmdRead, 0, 9, 0, 4, nil)
	deadline := time.Now().Add(5 * time.Second)
	for srv.Stats().InFlight != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("request never in flight: %+v", srv.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	if st := srv.Stats(); st.Connections != 1 {
		t.Fatalf("stats %+v, want one connection", st)
	}
	start := time.Now()
	if err := srv.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < lat/2 {
		t.Fatalf("Remove returned after %v, before the in-flight read (%v) was answered", el, lat)
	}
	// The answer arrived, then the connection was closed.
	if errno, cookie, data := c.reply(4); errno != 0 || cookie != 9 || string(data) != "data" {
		t.Fatalf("in-flight read: errno %d cookie %d data %q", errno, cookie, data)
	}
	if n, err := c.c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after Remove: read %d %v, want EOF", n, err)
	}
	if st := srv.Stats(); st.Connections != 0 || st.InFlight != 0 || st.Requests != 1 {
		t.Fatalf("stats after Remove %+v", st)
	}
}

func TestTCPListenerAndCloseEndsServe(t *testing.T) {
	srv := NewServer(logrus.New())
	srv.Add("", memdev.New(1<<20))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	out := run(t, "nbdinfo", "nbd://"+l.Addr().String())
	if !strings.Contains(out, "export-size: 1048576") {
		t.Fatalf("nbdinfo over TCP:\n%s", out)
	}
	srv.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
}

func TestRemoveCutsClients(t *testing.T) {
	log := logrus.New()
	srv := NewServer(log)
	srv.Add("a", memdev.New(1<<20))
	sock := filepath.Join(t.TempDir(), "s")
	l, _ := net.Listen("unix", sock)
	go srv.Serve(l)
	defer srv.Close()
	run(t, "nbdinfo", uri(sock, "a"))
	if err := srv.Remove("a"); err != nil {
		t.Fatal(err)
	}
	mustFail(t, "a", "nbdinfo", uri(sock, "a"))
	if err := srv.Remove("a"); err == nil {
		t.Fatal("removing twice succeeded")
	}
	if err := srv.Add("a", memdev.New(1)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Add("a", memdev.New(1)); err == nil {
		t.Fatal("duplicate Add succeeded")
	}
}
