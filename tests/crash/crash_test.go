// Package crash kills a real `vmthunder export` with SIGKILL at random
// moments and checks what a restart serves, using clients nobody here
// wrote (nbdcopy, qemu-io):
//
//   - a cache being filled: after every kill, every chunk the on-disk
//     bitmap marks present holds the origin's bytes, and a restart serves
//     the whole base byte for byte;
//   - copy-on-write: data acknowledged by FLUSH survives the kill;
//   - write-through: every acknowledged write is on the origin.
package crash

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
)

func TestMain(m *testing.M) { os.Exit(testbin.Main(m)) }

func need(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"nbdcopy", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}
}

type server struct {
	cmd  *exec.Cmd
	sock string
	log  *bytes.Buffer
}

// serve starts `vmthunder export` on a fresh unix socket and waits for it.
func serve(t *testing.T, args ...string) *server {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	s := &server{sock: sock, log: new(bytes.Buffer)}
	full := append([]string{"export", "--socket", sock}, args...)
	s.cmd = exec.Command(testbin.VmthunderT(t), full...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return s
		}
		if time.Now().After(deadline) || s.cmd.ProcessState != nil {
			s.kill()
			t.Fatalf("vmthunder %v did not listen: %s", full, s.log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *server) uri() string { return "nbd+unix:///?socket=" + s.sock }

func (s *server) kill() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.cmd.Wait()
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// qemuIO runs qemu-io commands against the export; a failed read -P shows
// as "Pattern verification failed".
func qemuIO(t *testing.T, s *server, cmds ...string) {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := run(t, "qemu-io", append(args, s.uri())...)
	if strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
}

func randomFile(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

// checkCacheOnDisk reads the cache files as a restart would and checks
// that no chunk marked present holds other bytes than the origin.
func checkCacheOnDisk(t *testing.T, cacheDir string, want []byte) (present int) {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(cacheDir, "*", "bitmap"))
	if len(dirs) != 1 {
		t.Fatalf("want one base in %s, found %v", cacheDir, dirs)
	}
	bm, err := os.ReadFile(dirs[0])
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(filepath.Dir(dirs[0]), "data"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := int(binary.LittleEndian.Uint64(bm[32:]))
	for c := 0; c*chunk < len(want); c++ {
		if bm[4096+c/8]&(1<<(c%8)) == 0 {
			continue
		}
		present++
		lo, hi := c*chunk, min((c+1)*chunk, len(want))
		if !bytes.Equal(data[lo:hi], want[lo:hi]) {
			t.Fatalf("chunk %d is marked present but holds other bytes than the origin", c)
		}
	}
	return present
}

func TestKillDuringCacheFill(t *testing.T) {
	need(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "base.img")
	want := randomFile(t, src, 32<<20+4096, 1)
	cache := filepath.Join(dir, "cache")
	rounds := 20
	for i := 0; i < rounds; i++ {
		s := serve(t, "--cache", cache, "--base", "tmpl", "--generation", "1", "--chunk-size", "65536", src)
		copier := exec.Command("nbdcopy", "--requests=16", s.uri(), "null:")
		copier.Start()
		time.Sleep(time.Duration(rand.IntN(100)) * time.Millisecond)
		s.kill()
		copier.Process.Kill()
		copier.Wait()
		n := checkCacheOnDisk(t, cache, want)
		t.Logf("round %d: %d chunks present after the kill", i, n)
		// Restart, and the whole base must come back byte for byte.
		s = serve(t, "--cache", cache, "--base", "tmpl", "--generation", "1", "--chunk-size", "65536", src)
		out := filepath.Join(dir, "round.img")
		os.Remove(out)
		run(t, "nbdcopy", s.uri(), out)
		s.kill()
		if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
			t.Fatalf("round %d: a restart after a kill served bytes other than the origin's", i)
		}
		if i%2 == 1 { // the restart filled it: start over, so kills land mid-fill
			os.RemoveAll(cache)
		}
	}
	s := serve(t, "--cache", cache, "--base", "tmpl", "--generation", "1", "--chunk-size", "65536", src)
	defer s.kill()
	out := filepath.Join(dir, "out.img")
	run(t, "nbdcopy", s.uri(), out)
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, want) {
		t.Fatalf("after %d kills the cache served bytes other than the origin's", rounds)
	}
	if n := checkCacheOnDisk(t, cache, want); n == 0 {
		t.Fatal("nothing was cached")
	}
	// The whole base is cached now. Replace the origin by zeroes of the
	// same size (root reads any file, so "unreadable" is not available):
	// a byte fetched from it would show.
	s.kill()
	os.Remove(src)
	if err := os.WriteFile(src, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(src, int64(len(want)))
	s2 := serve(t, "--cache", cache, "--base", "tmpl", "--generation", "1", "--chunk-size", "65536", src)
	defer s2.kill()
	os.Remove(out)
	run(t, "nbdcopy", s2.uri(), out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Fatal("a warm cache did not serve the base")
	}
}

func TestCOWFlushSurvivesKill(t *testing.T) {
	need(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "base.img")
	base := randomFile(t, src, 16<<20, 2)
	cache, store := filepath.Join(dir, "cache"), filepath.Join(dir, "vm.cow")
	type rec struct {
		pat      int
		off, len int
	}
	var acked []rec
	for i := 0; i < 10; i++ {
		s := serve(t, "--cache", cache, "--cow", store, src)
		for _, r := range acked { // everything flushed before any kill is there
			qemuIO(t, s, fmt.Sprintf("read -P %d %d %d", r.pat, r.off, r.len))
		}
		r := rec{pat: 1 + i, off: i*(1<<20) + rand.IntN(8192), len: 1 + rand.IntN(200_000)}
		qemuIO(t, s, fmt.Sprintf("write -P %d %d %d", r.pat, r.off, r.len), "flush")
		acked = append(acked, r)
		// Unflushed writes elsewhere while the kill comes.
		noise := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 99 12M 2M", "-c", "write -P 98 14M 1M", s.uri())
		noise.Start()
		time.Sleep(time.Duration(rand.IntN(30)) * time.Millisecond)
		s.kill()
		noise.Process.Kill()
		noise.Wait()
	}
	s := serve(t, "--cache", cache, "--cow", store, src)
	defer s.kill()
	for _, r := range acked {
		qemuIO(t, s, fmt.Sprintf("read -P %d %d %d", r.pat, r.off, r.len))
	}
	if got, _ := os.ReadFile(src); !bytes.Equal(got, base) {
		t.Fatal("copy-on-write wrote the base")
	}
}

func TestWriteThroughAckedOnOrigin(t *testing.T) {
	need(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "vol.img")
	vol := randomFile(t, src, 16<<20, 3)
	cache := filepath.Join(dir, "cache")
	for i := 0; i < 10; i++ {
		s := serve(t, "--cache", cache, "--write-through", src)
		qemuIO(t, s, "read 0 16M") // cache everything, so writes must update it
		off, n := rand.IntN(15<<20), 1+rand.IntN(300_000)
		qemuIO(t, s, fmt.Sprintf("write -P %d %d %d", 10+i, off, n))
		for j := off; j < off+n; j++ {
			vol[j] = byte(10 + i)
		}
		noise := exec.Command("qemu-io", "-f", "raw", "-c", "read 0 16M", s.uri())
		noise.Start()
		time.Sleep(time.Duration(rand.IntN(30)) * time.Millisecond)
		s.kill()
		noise.Process.Kill()
		noise.Wait()
		got, _ := os.ReadFile(src)
		if !bytes.Equal(got, vol) {
			t.Fatalf("round %d: an acknowledged write is not on the origin", i)
		}
		checkCacheOnDisk(t, cache, vol)
	}
	// A restart serves the origin's bytes, not stale cached ones.
	s := serve(t, "--cache", cache, "--write-through", src)
	defer s.kill()
	out := filepath.Join(dir, "out.img")
	run(t, "nbdcopy", s.uri(), out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, vol) {
		t.Fatal("the cache served stale bytes after write-through and a kill")
	}
}
