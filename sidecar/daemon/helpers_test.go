package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/internal/syncbuf"
)

// env is one in-process daemon on its own directories.
type env struct {
	t   *testing.T
	dir string
	cfg *config.Config
	d   *Daemon
	c   *client.Client
	log *syncbuf.Buffer // the daemon's log, for assertions
}

func newEnv(t *testing.T, mod func(*config.Config)) *env {
	t.Helper()
	// A short directory: unix socket paths are limited to 107 bytes.
	dir, err := os.MkdirTemp("", "vmtd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := config.Defaults()
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.CacheDir = filepath.Join(dir, "cache")
	cfg.APISocket = filepath.Join(dir, "run", "api.sock")
	cfg.NBDSocketDir = filepath.Join(dir, "run", "nbd")
	cfg.ChunkSize = 64 << 10
	// The tests' images and COW stores are in dir (access.go).
	cfg.AllowedOriginDirs = []string{dir}
	cfg.AllowedCowDirs = []string{dir}
	if mod != nil {
		mod(cfg)
	}
	e := &env{t: t, dir: dir, cfg: cfg, log: &syncbuf.Buffer{}}
	e.start()
	t.Cleanup(func() { e.stop() })
	return e
}

func (e *env) start() {
	e.t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.DebugLevel)
	log.SetOutput(e.log)
	d, err := New(e.cfg, log)
	if err != nil {
		e.t.Fatal(err)
	}
	d.RetryInterval = 200 * time.Millisecond
	if err := d.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.d = d
	e.c = client.New(e.cfg.APISocket)
}

func (e *env) stop() {
	if e.d != nil {
		if err := e.d.Close(); err != nil {
			e.t.Errorf("close daemon: %v", err)
		}
		e.d = nil
	}
}

func (e *env) restart() {
	e.t.Helper()
	e.stop()
	e.start()
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

// raw sends a request with a literal body and returns status and body.
func (e *env) raw(method, path, body string) (int, string) {
	e.t.Helper()
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", e.cfg.APISocket)
		}}}
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, "http://vmthunder"+path, rd)
	resp, err := hc.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// image writes n random bytes to a file in the env's directory.
func (e *env) image(name string, n int) (string, []byte) {
	e.t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		e.t.Fatal(err)
	}
	return p, b
}

// nbdRead reads a whole export with nbdcopy (libnbd's client, not ours).
func nbdRead(t *testing.T, uri string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	c := exec.Command("nbdcopy", uri, out)
	if b, err := c.CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy %s: %v: %s", uri, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuIO runs qemu-io commands against an NBD URI.
func qemuIO(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	b, err := exec.Command("qemu-io", args...).CombinedOutput()
	if err != nil || bytes.Contains(b, []byte("failed")) {
		t.Fatalf("qemu-io %v: %v: %s", cmds, err, b)
	}
	return string(b)
}
