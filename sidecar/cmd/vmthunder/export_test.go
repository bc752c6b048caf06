package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startExport runs `vmthunder export` and waits for its socket to accept.
func startExport(t *testing.T, sock string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"export", "--socket", sock}, args...)...)
	var se bytes.Buffer
	cmd.Stderr = &se
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return cmd, &se
		}
		if time.Now().After(deadline) {
			t.Fatalf("export did not come up: %s", se.String())
		}
	}
}

// runBounded runs the binary for at most a few seconds; a run that is
// still going (serving) counts as accepted.
func runBounded(t *testing.T, args ...string) (stderr string, code int, served bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var se bytes.Buffer
	cmd.Stderr = &se
	err := cmd.Run()
	if ctx.Err() != nil {
		return se.String(), -1, true
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return se.String(), ee.ExitCode(), false
	}
	if err != nil {
		t.Fatal(err)
	}
	return se.String(), 0, false
}

// A second export on the socket of a running one must not take it over:
// clients of the first (QEMU reconnecting) would get another disk.
func TestExportRefusesLiveSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtx-") // short: socket paths <= 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	a, _ := randomFile(t, dir, "a.img", 64<<10)
	b, _ := randomFile(t, dir, "b.img", 64<<10)
	sock := filepath.Join(dir, "d.sock")
	first, _ := startExport(t, sock, a)
	se, code, served := runBounded(t, "export", "--socket", sock, b)
	if served || code == 0 {
		t.Fatalf("second export on a live socket: served %v, exit %d: %s", served, code, se)
	}
	if !strings.Contains(se, sock) {
		t.Errorf("error does not name the socket: %s", se)
	}
	if c, err := net.Dial("unix", sock); err != nil {
		t.Fatalf("first export's socket gone: %v", err)
	} else {
		c.Close()
	}
	first.Process.Signal(syscall.SIGTERM)
	if err := first.Wait(); err != nil {
		t.Fatalf("first export: %v", err)
	}
}

// --chunk-size sizes the cache; without --cache there is none to size.
func TestExportChunkSizeWithoutCacheRefused(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtx-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	a, _ := randomFile(t, dir, "a.img", 64<<10)
	se, code, served := runBounded(t, "export", "--socket", filepath.Join(dir, "d.sock"), "--chunk-size", "1M", a)
	if served || code == 0 || !strings.Contains(se, "--chunk-size") {
		t.Fatalf("--chunk-size without --cache: served %v, exit %d: %s", served, code, se)
	}
}

// --socket-group hands the socket to QEMU's group, mode 0660; an unknown
// group is refused before anything is served.
func TestExportSocketGroup(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtx-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	a, _ := randomFile(t, dir, "a.img", 64<<10)
	g, err := user.LookupGroup("daemon")
	if err != nil {
		t.Fatalf("this test uses the group daemon: %v", err)
	}
	sock := filepath.Join(dir, "g.sock")
	startExport(t, sock, "--socket-group", "daemon", a)
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	gid := st.Sys().(*syscall.Stat_t).Gid
	if strconv.Itoa(int(gid)) != g.Gid || st.Mode().Perm() != 0o660 {
		t.Fatalf("socket gid %d mode %v, want gid %s mode 0660", gid, st.Mode().Perm(), g.Gid)
	}
	se, code, served := runBounded(t, "export", "--socket", filepath.Join(dir, "n.sock"), "--socket-group", "no-such-group-vmt", a)
	if served || code == 0 || !strings.Contains(se, "no-such-group-vmt") {
		t.Fatalf("unknown group: served %v, exit %d: %s", served, code, se)
	}
}

// Two processes cannot serve one COW store: the second is refused, so
// neither can flush its own bitmap over the other's acknowledged writes.
func TestExportRefusesCOWStoreInUse(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtx-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	base, _ := randomFile(t, dir, "base.img", 1<<20)
	store := filepath.Join(dir, "vm.cow")
	startExport(t, filepath.Join(dir, "a.sock"), "--cow", store, base)
	se, code, served := runBounded(t, "export", "--socket", filepath.Join(dir, "b.sock"), "--cow", store, base)
	if served || code == 0 || !strings.Contains(se, "in use") {
		t.Fatalf("second export of one cow store: served %v, exit %d: %s", served, code, se)
	}
}

// A cached export of a volume does not outlive the volume's change: the
// next run serves the new bytes. A template generation's cache is kept.
func TestExportCacheCoherency(t *testing.T) {
	dir, err := os.MkdirTemp("", "vmtx-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	src, _ := randomFile(t, dir, "vol.img", 1<<20)
	cache := filepath.Join(dir, "cache")
	read := func(args ...string) []byte {
		sock := filepath.Join(dir, "d.sock")
		cmd, _ := startExport(t, sock, append([]string{"--cache", cache}, append(args, src)...)...)
		out := filepath.Join(dir, "out.raw")
		if b, err := exec.Command("nbdcopy", "nbd+unix:///?socket="+sock, out).CombinedOutput(); err != nil {
			t.Fatalf("nbdcopy: %v %s", err, b)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		b, _ := os.ReadFile(out)
		return b
	}
	read()
	_, want := randomFile(t, dir, "vol.img", 1<<20)
	if !bytes.Equal(read(), want) {
		t.Fatal("a volume's cache served bytes from before the volume changed")
	}
	tmpl := read("--base", "img", "--generation", "1")
	randomFile(t, dir, "vol.img", 1<<20)
	if !bytes.Equal(read("--base", "img", "--generation", "1"), tmpl) {
		t.Fatal("a template generation's cache was not kept")
	}
}
