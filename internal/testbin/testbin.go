// Package testbin finds or builds the commands of this module that tests
// run as child processes, above all the vmthunder binary under test.
//
// It sits at the module root, not under sidecar/, so that the tests in
// tests/ may import it too (Go lets only the tree above internal/ in).
// It imports no test package: tests/demo and tests/e2e/benchboot, which
// are commands, use it as well.
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
)

// EnvVar names the prebuilt vmthunder binary to test; `make test` sets it.
const EnvVar = "VMTHUNDER_BIN"

// VmthunderPkg is the vmthunder command, relative to the module root.
const VmthunderPkg = "./sidecar/cmd/vmthunder"

var (
	mu    sync.Mutex
	dir   string // the temporary directory Build writes to; "" until the first build
	built = map[string]*build{}
)

type build struct {
	once sync.Once
	path string
	err  error
}

// Vmthunder returns the vmthunder binary under test: $VMTHUNDER_BIN when it
// is set (the file must exist), or else one built from this tree by Build.
func Vmthunder() (string, error) {
	if b := os.Getenv(EnvVar); b != "" {
		if _, err := os.Stat(b); err != nil {
			return "", fmt.Errorf("%s=%s: %w", EnvVar, b, err)
		}
		return b, nil
	}
	return Build(VmthunderPkg)
}

// Build builds the command pkg of this module (a path relative to the
// module root, such as "./sidecar/internal/tgt/tgtup") with `go build`,
// once per process whoever asks, into a temporary directory that Cleanup
// removes. It returns the binary's path, named after pkg's last element.
// It is safe for concurrent use; a failed build fails every later call.
func Build(pkg string) (string, error) {
	mu.Lock()
	b := built[pkg]
	if b == nil {
		b = &build{}
		built[pkg] = b
	}
	mu.Unlock()
	b.once.Do(func() { b.path, b.err = goBuild(pkg) })
	return b.path, b.err
}

func goBuild(pkg string) (string, error) {
	mu.Lock()
	if dir == "" {
		d, err := os.MkdirTemp("", "vmthunder-testbin-")
		if err != nil {
			mu.Unlock()
			return "", err
		}
		dir = d
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	mu.Unlock()
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = moduleRoot()
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return out, nil
}

// moduleRoot is the directory of go.mod, found from this file's path.
func moduleRoot() string {
	_, self, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(self), "..", "..")
}

// Cleanup removes every binary Build made in this process. Call it once
// the binaries are no longer run: at the end of TestMain, or of a command.
func Cleanup() {
	mu.Lock()
	defer mu.Unlock()
	if dir != "" {
		os.RemoveAll(dir)
		dir = ""
	}
	built = map[string]*build{}
}

// TB is the part of testing.TB that VmthunderT needs.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
}

// VmthunderT is Vmthunder for a test: it fails t when there is no binary.
// A package that has no TestMain of its own runs
//
//	func TestMain(m *testing.M) { os.Exit(testbin.Main(m)) }
//
// so that the binary is removed at the end.
func VmthunderT(t TB) string {
	t.Helper()
	b, err := Vmthunder()
	if err != nil {
		t.Fatalf("vmthunder binary: %v", err)
	}
	return b
}

// Main runs the tests of m, then Cleanup, and returns the exit code.
func Main(m interface{ Run() int }) int {
	defer Cleanup()
	return m.Run()
}
