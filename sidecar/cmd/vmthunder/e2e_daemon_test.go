package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
)

// bin is the vmthunder binary under test: $VMTHUNDER_BIN (make test sets
// it) or one built from this tree in TestMain.
var bin string

func TestMain(m *testing.M) {
	var err error
	if bin, err = testbin.Vmthunder(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(testbin.Main(m))
}

// daemonProc is a `vmthunder daemon` process on its own directories.
type daemonProc struct {
	t    *testing.T
	dir  string
	conf string
	api  string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func startDaemonProc(t *testing.T) *daemonProc {
	t.Helper()
	dir := daemonTempDir(t, "vmte-")
	return startDaemonIn(t, dir, daemonConfig{
		// the tests' images are in the temp dir
		defaults: "allowed_origin_dirs = " + dir + "\n",
		cache:    "size_budget = 1G\n",
	})
}

// daemonTempDir is a new directory for one daemon, removed when the test
// ends; prefix keeps it short, as socket paths are at most 107 bytes.
func daemonTempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// daemonConfig is what a test adds to the config every daemonProc has
// (its state, sockets and cache under its directory, debug logs).
type daemonConfig struct {
	defaults string // more [DEFAULT] lines
	cache    string // more [cache] lines
	sections string // more sections
}

// startDaemonIn writes the config into dir and starts the daemon on it;
// the test's end stops it.
func startDaemonIn(t *testing.T, dir string, c daemonConfig) *daemonProc {
	t.Helper()
	p := &daemonProc{t: t, dir: dir, conf: filepath.Join(dir, "vmthunder.conf"),
		api: filepath.Join(dir, "run", "api.sock"), log: filepath.Join(dir, "daemon.log")}
	conf := fmt.Sprintf(`[DEFAULT]
state_dir = %[1]s/state
api_socket = %[1]s/run/api.sock
nbd_socket_dir = %[1]s/run/nbd
log_level = debug
%[2]s
[cache]
dir = %[1]s/cache
chunk_size = 64K
%[3]s`, dir, c.defaults, c.cache)
	if c.sections != "" {
		conf += "\n" + c.sections
	}
	if err := os.WriteFile(p.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	p.start()
	t.Cleanup(p.stop)
	return p
}

func (p *daemonProc) start() {
	p.t.Helper()
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd := exec.Command(bin, "daemon", "--config", p.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(p.done) }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := client.New(p.api).WaitHealthy(ctx); err != nil {
		p.stop()
		b, _ := os.ReadFile(p.log)
		p.t.Fatalf("%v\n%s", err, b)
	}
}

// stop sends SIGTERM and waits; the daemon must exit cleanly.
func (p *daemonProc) stop() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if !p.cmd.ProcessState.Success() {
			b, _ := os.ReadFile(p.log)
			p.t.Errorf("daemon exited with %v\n%s", p.cmd.ProcessState, b)
		}
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		p.t.Errorf("daemon did not stop within 30 s of SIGTERM")
	}
	p.cmd = nil
}

// cli runs the binary against this daemon; it returns stdout, stderr and
// the exit code.
func (p *daemonProc) cli(args ...string) (string, string, int) {
	p.t.Helper()
	cmd := exec.Command(bin, append([]string{"--socket", p.api}, args...)...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		p.t.Fatal(err)
	}
	return so.String(), se.String(), code
}

func (p *daemonProc) mustCLI(args ...string) string {
	p.t.Helper()
	out, errOut, code := p.cli(args...)
	if code != 0 {
		p.t.Fatalf("vmthunder %v: exit %d: %s", args, code, errOut)
	}
	return out
}

func randomFile(t *testing.T, dir, name string, n int) (string, []byte) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

func nbdcopyRead(t *testing.T, uri string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "read.raw")
	if b, err := exec.Command("nbdcopy", uri, out).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy %s: %v: %s", uri, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The daemon restarts under a running client: the same NBD URI serves the
// same bytes, COW writes made before the restart are kept, and a QEMU
// client with reconnect-delay (what libvirt's <reconnect delay='N'/> sets)
// rides through without an I/O error.
func TestDaemonRestart(t *testing.T) {
	p := startDaemonProc(t)
	img, data := randomFile(t, p.dir, "base.raw", 4<<20)
	out := p.mustCLI("attach", "--id", "vm1", "--origin", img, "--mode", "cow", "--json")
	var x api.Export
	if err := json.Unmarshal([]byte(out), &x); err != nil {
		t.Fatalf("attach --json: %v: %s", err, out)
	}
	if x.URI != "nbd+unix:///vm1?socket="+p.dir+"/run/nbd/vm1.sock" {
		t.Fatalf("uri %s", x.URI)
	}
	if !bytes.Equal(nbdcopyRead(t, x.URI), data) {
		t.Fatal("export does not serve the origin's bytes")
	}
	// qemu-io write + flush, acknowledged before the restart.
	if b, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0xa5 1048576 65536", "-c", "flush", x.URI).CombinedOutput(); err != nil || !strings.Contains(string(b), "wrote 65536") {
		t.Fatalf("qemu-io write: %v: %s", err, b)
	}
	want := append([]byte(nil), data...)
	copy(want[1<<20:], bytes.Repeat([]byte{0xa5}, 65536))

	// A QEMU client that stays connected across the restart.
	qio := exec.Command("qemu-io", "--image-opts",
		"driver=nbd,server.type=unix,server.path="+x.Socket+",export=vm1,reconnect-delay=20")
	stdin, _ := qio.StdinPipe()
	stdout, _ := qio.StdoutPipe()
	qio.Stderr = qio.Stdout
	qio.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := qio.Start(); err != nil {
		t.Fatal(err)
	}
	defer qio.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	// do sends one command and waits for its result line.
	do := func(cmd, expect string) {
		t.Helper()
		fmt.Fprintln(stdin, cmd)
		deadline := time.After(40 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("qemu-io exited during %q", cmd)
				}
				if strings.Contains(l, "failed") || strings.Contains(l, "error") {
					t.Fatalf("qemu-io %q: %s", cmd, l)
				}
				if strings.Contains(l, expect) {
					return
				}
			case <-deadline:
				t.Fatalf("qemu-io %q: no %q within 40 s", cmd, expect)
			}
		}
	}
	do("read -P 0xa5 1048576 65536", "read 65536/65536")

	p.stop()
	p.start()

	// The connected client reconnects: reads see the pre-restart write, and
	// a new write lands in the same COW store.
	do("read -P 0xa5 1048576 65536", "read 65536/65536")
	do("write -P 0x3c 0 4096", "wrote 4096/4096")
	do("flush", "")
	fmt.Fprintln(stdin, "quit")
	stdin.Close()
	qio.Wait()
	copy(want, bytes.Repeat([]byte{0x3c}, 4096))

	if got := nbdcopyRead(t, x.URI); !bytes.Equal(got, want) {
		t.Fatal("after the restart the export does not serve the expected bytes")
	}
	if b, _ := os.ReadFile(img); !bytes.Equal(b, data) {
		t.Fatal("a cow export changed its origin")
	}
	list := p.mustCLI("list", "--json")
	var l api.ExportList
	if err := json.Unmarshal([]byte(list), &l); err != nil || len(l.Exports) != 1 || l.Exports[0].URI != x.URI || l.Exports[0].CowPath != x.CowPath {
		t.Fatalf("list after restart: %v %s", err, list)
	}
}

// The CLI drives the daemon: attach, list, warm, detach, status, copy, and
// prints the daemon's error with a non-zero exit.
func TestCLI(t *testing.T) {
	p := startDaemonProc(t)
	img, data := randomFile(t, p.dir, "tmpl.raw", 3<<20)

	// warm a base before any export, with the progress bar on stderr.
	_, errOut, code := p.cli("warm", "--origin", img, "--generation", "1", "tmpl")
	if code != 0 {
		t.Fatalf("warm: exit %d: %s", code, errOut)
	}
	if !strings.Contains(errOut, "warm tmpl") || !strings.Contains(errOut, "100%") {
		t.Errorf("warm progress: %q", errOut)
	}
	bases := p.mustCLI("bases", "--json")
	var bl api.BaseList
	if err := json.Unmarshal([]byte(bases), &bl); err != nil || len(bl.Bases) != 1 || bl.Bases[0].PresentBytes != int64(len(data)) || bl.Bases[0].Warm.State != api.WarmDone {
		t.Fatalf("bases after warm: %v %s", err, bases)
	}

	// attach with a relative origin path; text output.
	rel, _ := filepath.Rel(mustGetwd(t), img)
	out := p.mustCLI("attach", "--id", "vm-a", "--origin", rel, "--base", "tmpl", "--generation", "1", "--mode", "readonly")
	if !strings.Contains(out, "nbd+unix:///vm-a?socket=") || !strings.Contains(out, "readonly") {
		t.Errorf("attach output: %s", out)
	}
	p.mustCLI("attach", "--id", "vm-b", "--origin", img, "--base", "tmpl", "--generation", "1")
	out = p.mustCLI("list")
	if !strings.Contains(out, "vm-a") || !strings.Contains(out, "vm-b") || !strings.Contains(out, "cow") {
		t.Errorf("list: %s", out)
	}
	if got := nbdcopyRead(t, "nbd+unix:///vm-b?socket="+p.dir+"/run/nbd/vm-b.sock"); !bytes.Equal(got, data) {
		t.Error("vm-b differs from the origin")
	}
	st := p.mustCLI("stats")
	var s api.Stats
	if err := json.Unmarshal([]byte(st), &s); err != nil || s.Exports != 2 || s.OriginBytes != 0 || s.CacheHitBytes < uint64(len(data)) {
		t.Errorf("stats after warm + read: %v %s", err, st)
	}
	if out := p.mustCLI("status"); !strings.Contains(out, "ok") || !strings.Contains(out, "exports     2") {
		t.Errorf("status: %s", out)
	}

	// Errors: the daemon's message, exit 1.
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"attach", "--id", "vm-a", "--origin", img}, `export "vm-a" already exists`},
		{[]string{"attach", "--id", "x", "--origin", img, "--mode", "rw"}, `unknown mode "rw"`},
		{[]string{"attach", "--id", "x"}, `missing field "origin"`},
		{[]string{"attach", "--id", "x", "--origin", "iscsi://127.0.0.1/bogus/0"}, `bad target IQN`},
		{[]string{"detach", "nope"}, `no export "nope"`},
		{[]string{"warm", "unknown-base"}, `has no export`},
	} {
		_, errOut, code := p.cli(tc.args...)
		if code != 1 || !strings.Contains(errOut, tc.msg) {
			t.Errorf("vmthunder %v: exit %d, stderr %q; want 1 and %q", tc.args, code, errOut, tc.msg)
		}
	}

	p.mustCLI("detach", "vm-a")
	p.mustCLI("detach", "--delete-cow", "vm-b")
	if _, err := os.Stat(filepath.Join(p.dir, "state", "cow", "vm-b.img")); !os.IsNotExist(err) {
		t.Errorf("cow store after detach --delete-cow: %v", err)
	}
	if out := p.mustCLI("list", "--json"); !strings.Contains(out, `"exports": []`) {
		t.Errorf("list after detach: %s", out)
	}

	// copy: a pre-copy of the origin, with progress.
	dst := filepath.Join(p.dir, "copy.raw")
	cmd := exec.Command(bin, "copy", img, dst)
	var se bytes.Buffer
	cmd.Stderr = &se
	if err := cmd.Run(); err != nil {
		t.Fatalf("copy: %v: %s", err, se.String())
	}
	if b, _ := os.ReadFile(dst); !bytes.Equal(b, data) {
		t.Error("copy differs from the source")
	}
	if !strings.Contains(se.String(), "100%") {
		t.Errorf("copy progress: %q", se.String())
	}
	if _, err := os.Stat(dst + ".part"); !os.IsNotExist(err) {
		t.Errorf("copy left %s.part", dst)
	}
	if b, err := exec.Command(bin, "copy", filepath.Join(p.dir, "missing.raw"), dst+"2").CombinedOutput(); err == nil || !strings.Contains(string(b), "missing.raw") {
		t.Errorf("copy of a missing source: %v %s", err, b)
	}

	// No daemon at the socket: a clear error.
	b, err := exec.Command(bin, "--socket", filepath.Join(p.dir, "none.sock"), "list").CombinedOutput()
	if err == nil || !strings.Contains(string(b), "none.sock") {
		t.Errorf("list without a daemon: %v %s", err, b)
	}
}

func mustGetwd(t *testing.T) string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return wd
}
