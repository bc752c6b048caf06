package guestimage

import (
	"os/exec"
	"strings"
	"testing"
)

// The image builds, is reproducible, and holds what the guest's init needs.
func TestBuild(t *testing.T) {
	a, err := Build(Options{Dir: t.TempDir(), Size: 128 << 20, Files: 40})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Build(Options{Dir: t.TempDir(), Size: 128 << 20, Files: 40})
	if err != nil {
		t.Fatal(err)
	}
	if a.SHA256 != b.SHA256 {
		t.Fatalf("two builds with the same options differ: %s vs %s", a.SHA256, b.SHA256)
	}
	if a.BootReadBytes <= 0 || a.BootReadBytes >= a.DataBytes {
		t.Fatalf("boot reads %d of %d data bytes", a.BootReadBytes, a.DataBytes)
	}
	out, err := exec.Command("debugfs", "-R", "cat /sbin/init", a.Root).Output()
	if err != nil {
		t.Fatalf("debugfs: %v", err)
	}
	if !strings.Contains(string(out), Marker) {
		t.Fatalf("/sbin/init in the image does not print the marker:\n%s", out)
	}
	if s, err := a.ReadWriteBlock(a.Root); err != nil || s != "" {
		t.Fatalf("write block of a fresh image: %q, %v", s, err)
	}
}
