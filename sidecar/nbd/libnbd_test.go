package nbd

import (
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// python3 from Debian is the one with libnbd's bindings (python3-libnbd);
// a python3 earlier in PATH (pyenv) may lack them.
var (
	libnbdOnce   sync.Once
	libnbdPython string
)

func libnbdInterpreter() string {
	libnbdOnce.Do(func() {
		for _, py := range []string{"/usr/bin/python3", "python3"} {
			if exec.Command(py, "-c", "import nbd; nbd.NBD().set_strict_mode").Run() == nil {
				libnbdPython = py
				return
			}
		}
	})
	return libnbdPython
}

// libnbd runs a Python script with libnbd's bindings (a client nobody here
// wrote), passing args as sys.argv[1:], and returns what it printed. It
// fails the test when the script fails, and skips it when the bindings
// are not installed (Debian: python3-libnbd).
func libnbd(t *testing.T, script string, args ...string) string {
	t.Helper()
	py := libnbdInterpreter()
	if py == "" {
		t.Skip("python3-libnbd is not installed")
	}
	prelude := "import sys, errno, nbd\n"
	out, err := exec.Command(py, append([]string{"-c", prelude + script}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("libnbd script failed: %v\n%s\n--- script ---\n%s", err, out, script)
	}
	return strings.TrimSpace(string(out))
}
