package daemon

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
)

// runAs runs a command with another uid, gid and supplementary groups.
func runAs(uid, gid uint32, groups []uint32, name string, args ...string) (string, error) {
	c := exec.Command(name, args...)
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
	c.Dir = "/"
	b, err := c.CombinedOutput()
	return string(b), err
}

func lookupIDs(t *testing.T, name string) (uint32, uint32) {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uint32(uid), uint32(gid)
}

// The API and NBD sockets admit root and members of socket_group, and
// refuse everyone else.
func TestSocketPermissions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test runs as root (make test does): it creates a user and a group")
	}
	// A throwaway group and a member; names unique per run (tests of other
	// packages may do the same at once).
	suffix := fmt.Sprintf("%d", os.Getpid()%1000000)
	group, member := "vmtg"+suffix, "vmtu"+suffix
	if out, err := exec.Command("groupadd", "--system", group).CombinedOutput(); err != nil {
		t.Fatalf("groupadd: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("groupdel", group).Run() })
	if out, err := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--gid", group, member).CombinedOutput(); err != nil {
		t.Fatalf("useradd: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("userdel", member).Run() })

	e := newEnv(t, func(c *config.Config) { c.NBDGroup, c.APIGroup = group, group })
	if err := os.Chmod(e.dir, 0o755); err != nil { // let others reach run/
		t.Fatal(err)
	}
	img, _ := e.image("a.raw", 1<<20)
	x, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		t.Fatal(err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	for _, p := range []string{e.cfg.APISocket, x.Socket, e.cfg.NBDSocketDir} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		want := os.FileMode(0o660)
		if p == e.cfg.NBDSocketDir {
			want = 0o750
		}
		if sys.Uid != 0 || int(sys.Gid) != gid || st.Mode().Perm() != want {
			t.Errorf("%s: owner %d:%d mode %v; want 0:%d %v", p, sys.Uid, sys.Gid, st.Mode().Perm(), gid, want)
		}
	}

	health := []string{"-sS", "--max-time", "10", "--unix-socket", e.cfg.APISocket, "http://vmthunder/v1/health"}
	nUID, nGID := lookupIDs(t, "nobody")
	mUID, mGID := lookupIDs(t, member)

	// curl does not print the errno; the member below reaching the same
	// path shows the refusal is the socket's mode.
	out, err := runAs(nUID, nGID, nil, "curl", health...)
	if err == nil || strings.Contains(out, "status") || !strings.Contains(out, "Couldn't connect") {
		t.Errorf("nobody reached the API: %v %s", err, out)
	}
	out, err = runAs(nUID, nGID, nil, "nbdinfo", "--size", x.URI)
	if err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("nobody opened the NBD export: %s", out)
	}

	out, err = runAs(mUID, mGID, []uint32{mGID}, "curl", health...)
	if err != nil || !strings.Contains(out, `"status": "ok"`) {
		t.Errorf("group member refused by the API: %v %s", err, out)
	}
	out, err = runAs(mUID, mGID, []uint32{mGID}, "nbdinfo", "--size", x.URI)
	if err != nil || strings.TrimSpace(out) != "1048576" {
		t.Errorf("group member refused by the NBD socket: %v %s", err, out)
	}
}
