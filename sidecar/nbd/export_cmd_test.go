package nbd

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
)

func TestMain(m *testing.M) { os.Exit(testbin.Main(m)) }

// vmthunder is the binary under test: $VMTHUNDER_BIN, or built from this tree.
func vmthunder(t *testing.T) string { return testbin.VmthunderT(t) }

// startExport runs `vmthunder export ARGS...` and returns once it says it
// is serving, with the address it printed.
func startExport(t *testing.T, args ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(vmthunder(t), append([]string{"export"}, args...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ready := make(chan string, 1)
	var log bytes.Buffer
	var logMu sync.Mutex
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logMu.Lock()
			log.WriteString(sc.Text() + "\n")
			logMu.Unlock()
			if m := regexp.MustCompile(`serving .* on (\S+)$`).FindStringSubmatch(sc.Text()); m != nil {
				ready <- m[1]
			}
		}
	}()
	select {
	case where := <-ready:
		return cmd, where
	case <-time.After(20 * time.Second):
		logMu.Lock()
		defer logMu.Unlock()
		t.Fatalf("vmthunder export %s never said it was serving:\n%s", strings.Join(args, " "), log.String())
	}
	return nil, ""
}

// stop sends SIGTERM and expects a clean exit.
func stop(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("vmthunder export after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("vmthunder export did not exit after SIGTERM")
	}
}

func randomFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	path := filepath.Join(t.TempDir(), "src.img")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

func TestExportCommandServesAFileUntilSIGTERM(t *testing.T) {
	path, data := randomFile(t, 8<<20)
	sock := filepath.Join(t.TempDir(), "export.sock")
	cmd, where := startExport(t, "--socket", sock, path)
	if where != "unix:"+sock {
		t.Fatalf("ready line names %q, want unix:%s", where, sock)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm()&0o660 != 0o660 {
		t.Fatalf("socket mode: %v %v, want at least 0660", st.Mode(), err)
	}
	u := "nbd+unix:///?socket=" + sock // the default export name ""
	if out := run(t, "nbdinfo", u); !strings.Contains(out, "export-size: 8388608") || !strings.Contains(out, "can_multi_conn: true") {
		t.Fatalf("nbdinfo:\n%s", out)
	}
	out := filepath.Join(t.TempDir(), "copy.img")
	run(t, "nbdcopy", u, out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("nbdcopy out of vmthunder export differs from the source")
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 64k", "-c", "write -z 1M 1M", u)
	stop(t, cmd)
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got[4096:4096+64<<10], bytes.Repeat([]byte{0x5a}, 64<<10)) || !bytes.Equal(got[1<<20:2<<20], make([]byte, 1<<20)) {
		t.Fatal("writes through vmthunder export did not reach the file")
	}
	if !bytes.Equal(got[:4096], data[:4096]) || !bytes.Equal(got[2<<20:], data[2<<20:]) {
		t.Fatal("vmthunder export changed bytes nobody wrote")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after shutdown: %v", err)
	}
}

func TestExportCommandReadOnlyTCPAndDelay(t *testing.T) {
	path, data := randomFile(t, 1<<20)
	cmd, where := startExport(t, "--listen", "127.0.0.1:0", "--name", "base", "--readonly", "--delay-read", "100ms", path)
	addr, ok := strings.CutPrefix(where, "tcp:")
	if !ok {
		t.Fatalf("ready line names %q, want tcp:HOST:PORT", where)
	}
	u := "nbd://" + addr + "/base"
	mustFail(t, "Permission denied", "qemu-io", "-f", "raw", "-c", "write 0 4k", u)
	out := filepath.Join(t.TempDir(), "copy.img")
	start := time.Now()
	run(t, "qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", u)
	if el := time.Since(start); el < 100*time.Millisecond {
		t.Fatalf("a read with --delay-read 100ms took %v", el)
	}
	run(t, "nbdcopy", u, out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("nbdcopy over TCP differs from the source")
	}
	mustFail(t, "nope", "nbdinfo", "nbd://"+addr+"/nope")
	stop(t, cmd)
}

func TestExportCommandBadInput(t *testing.T) {
	bin := vmthunder(t)
	missing := filepath.Join(t.TempDir(), "missing.img")
	sock := filepath.Join(t.TempDir(), "s.sock")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--socket", sock}, "SOURCE"},
		{[]string{missing}, "--socket or --listen"},
		{[]string{"--socket", sock, missing}, missing},
		{[]string{"--socket", sock, "--cow", "x", "--write-through", missing}, "exclude"},
		{[]string{"--socket", sock, "--chunk-size", "lots", missing}, "--chunk-size"},
	} {
		out, err := exec.Command(bin, append([]string{"export"}, tc.args...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("vmthunder export %s: %v, output lacks %q:\n%s", strings.Join(tc.args, " "), err, tc.want, out)
		}
	}
}
