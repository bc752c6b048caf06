package testbin

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestEnvVarWins(t *testing.T) {
	f := filepath.Join(t.TempDir(), "prebuilt")
	if err := os.WriteFile(f, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvVar, f)
	if got, err := Vmthunder(); err != nil || got != f {
		t.Fatalf("Vmthunder() = %q, %v; want %q", got, err, f)
	}
	t.Setenv(EnvVar, f+".missing")
	if _, err := Vmthunder(); err == nil || !strings.Contains(err.Error(), EnvVar) {
		t.Fatalf("missing $%s: err = %v", EnvVar, err)
	}
}

func TestBuildOncePerProcess(t *testing.T) {
	t.Setenv(EnvVar, "")
	defer Cleanup()
	var wg sync.WaitGroup
	paths := make([]string, 3)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := Vmthunder()
			if err != nil {
				t.Error(err)
			}
			paths[i] = p
		}()
	}
	wg.Wait()
	if paths[0] != paths[1] || paths[1] != paths[2] {
		t.Fatalf("three builds: %q", paths)
	}
	if filepath.Base(paths[0]) != "vmthunder" {
		t.Fatalf("binary named %q", paths[0])
	}
	out, _ := exec.Command(paths[0], "export", "-h").CombinedOutput()
	if !strings.Contains(string(out), "usage: vmthunder export") {
		t.Fatalf("built binary does not run: %s", out)
	}
	Cleanup()
	if _, err := os.Stat(paths[0]); !os.IsNotExist(err) {
		t.Fatalf("Cleanup left %s: %v", paths[0], err)
	}
}

func TestBuildFailureIsReported(t *testing.T) {
	defer Cleanup()
	if _, err := Build("./no/such/command"); err == nil {
		t.Fatal("building a missing package succeeded")
	}
}
