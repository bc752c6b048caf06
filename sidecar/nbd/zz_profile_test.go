//go:build nbdprofile

package nbd

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"
)

// Temporary: profile the server under fio. NBD_PROFILE_IMG=path.
func TestZZProfile(t *testing.T) {
	img := os.Getenv("NBD_PROFILE_IMG")
	if img == "" {
		t.Skip()
	}
	log := logrus.New()
	srv := NewServer(log)
	srv.Add("", openFile(t, img, true))
	sock := filepath.Join(t.TempDir(), "s")
	l, _ := net.Listen("unix", sock)
	go srv.Serve(l)
	defer srv.Close()
	args := []string{"--name=b", "--ioengine=nbd", "--uri=" + uri(sock, ""), "--rw=" + envOr("RW", "randread"), "--bs=" + envOr("BS", "4k"), "--iodepth=32", "--runtime=8", "--time_based"}
	out, err := exec.Command("fio", args...).CombinedOutput()
	t.Logf("%s %v", out, err)
}

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}
