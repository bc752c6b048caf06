package daemon

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
)

// runAs runs a command as user name with its primary group and
// supplementary groups, through setpriv (util-linux), as an operator
// would with sudo -u.
func runAs(t *testing.T, name string, cmd ...string) (string, error) {
	t.Helper()
	args := append([]string{"--reuid", name, "--regid", lookupGID(t, name), "--init-groups", "--"}, cmd...)
	c := exec.Command("setpriv", args...)
	c.Dir = "/"
	b, err := c.CombinedOutput()
	return string(b), err
}

func lookupGID(t *testing.T, name string) string {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	return u.Gid
}

// ensureUser makes group and a system user in it unless they exist; what
// it made is removed at the end of the test.
func ensureUser(t *testing.T, name, group string) {
	t.Helper()
	if _, err := user.LookupGroup(group); err != nil {
		if out, err := exec.Command("groupadd", "--system", group).CombinedOutput(); err != nil {
			if _, err2 := user.LookupGroup(group); err2 != nil { // not a concurrent groupadd
				t.Fatalf("groupadd %s: %v: %s", group, err, out)
			}
		} else {
			t.Cleanup(func() { exec.Command("groupdel", group).Run() })
		}
	}
	if _, err := user.Lookup(name); err != nil {
		if out, err := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--gid", group, name).CombinedOutput(); err != nil {
			if _, err2 := user.Lookup(name); err2 != nil {
				t.Fatalf("useradd %s: %v: %s", name, err, out)
			}
		} else {
			// Runs before the groupdel above (cleanups are LIFO).
			t.Cleanup(func() { exec.Command("userdel", name).Run() })
		}
	}
	// A user left by an earlier run must still be in the group.
	u, _ := user.Lookup(name)
	g, _ := user.LookupGroup(group)
	if u.Gid != g.Gid {
		t.Fatalf("user %s exists with primary gid %s, not %s's %s", name, u.Gid, group, g.Gid)
	}
}

// QEMU (vmt-qemu, group vmt-nbd = nbd_group) reaches its NBD socket and
// nothing else: it cannot connect to the API socket at all. nova-compute
// (vmt-nova, group vmt-api = api_group) uses the API but gets 403
// forbidden for /etc/shadow, a symlink out of allowed_origin_dirs and a
// cow_path outside allowed_cow_dirs, and cannot open NBD sockets. Others
// get neither. All through the real daemon, as those users.
func TestSocketPermissions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test runs as root (make test does): it creates users and groups")
	}
	ensureUser(t, "vmt-qemu", "vmt-nbd")
	ensureUser(t, "vmt-nova", "vmt-api")
	for _, tool := range []string{"setpriv", "curl", "nbdinfo"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}

	var images string
	e := newEnv(t, func(c *config.Config) {
		c.NBDGroup, c.APIGroup = "vmt-nbd", "vmt-api"
		images = filepath.Join(filepath.Dir(c.StateDir), "images")
		c.AllowedOriginDirs = []string{images}
		c.AllowedCowDirs = nil // state_dir/cow
	})
	if err := os.Chmod(e.dir, 0o755); err != nil { // let others reach run/
		t.Fatal(err)
	}
	if err := os.Mkdir(images, 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(images, "a.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/shadow", filepath.Join(images, "esc")); err != nil {
		t.Fatal(err)
	}
	x, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}

	gid := func(name string) uint32 {
		g, err := user.LookupGroup(name)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(g.Gid)
		return uint32(n)
	}
	apiGID, nbdGID := gid("vmt-api"), gid("vmt-nbd")
	for _, c := range []struct {
		path string
		gid  uint32
		mode os.FileMode
	}{
		{e.cfg.APISocket, apiGID, 0o660},
		{filepath.Dir(e.cfg.APISocket), apiGID, 0o751}, // nbd/ is below: others may pass, not list
		{x.Socket, nbdGID, 0o660},
		{e.cfg.NBDSocketDir, nbdGID, 0o750},
	} {
		st, err := os.Stat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if sys.Uid != 0 || sys.Gid != c.gid || st.Mode().Perm() != c.mode {
			t.Errorf("%s: owner %d:%d mode %v; want 0:%d %v", c.path, sys.Uid, sys.Gid, st.Mode().Perm(), c.gid, c.mode)
		}
	}

	curl := func(as, method, path, body string) (string, error) {
		args := []string{"curl", "-sS", "--max-time", "10", "--unix-socket", e.cfg.APISocket, "-X", method,
			"-w", "\nHTTP %{http_code}\n"}
		if body != "" {
			args = append(args, "-H", "Content-Type: application/json", "-d", body)
		}
		return runAs(t, as, append(args, "http://vmthunder"+path)...)
	}
	create := func(id, origin, mode, cow string) string {
		b := `{"id":"` + id + `","origin":"` + origin + `","mode":"` + mode + `"`
		if cow != "" {
			b += `,"cow_path":"` + cow + `"`
		}
		return b + "}"
	}

	// QEMU's user: no API at all, not even to ask for an export of a file
	// that would be allowed; its NBD socket works.
	for _, body := range []string{create("q1", "/etc/shadow", "readonly", ""), create("q2", img, "readonly", "")} {
		out, err := curl("vmt-qemu", "POST", "/v1/exports", body)
		if err == nil || !strings.Contains(out, "Couldn't connect") || strings.Contains(out, "HTTP 2") {
			t.Errorf("nbd_group member reached the API: %v %s", err, out)
		}
	}
	if out, err := curl("vmt-qemu", "GET", "/v1/health", ""); err == nil || !strings.Contains(out, "Couldn't connect") {
		t.Errorf("nbd_group member reached the API: %v %s", err, out)
	}
	if out, err := runAs(t, "vmt-qemu", "nbdinfo", "--size", x.URI); err != nil || strings.TrimSpace(out) != "1048576" {
		t.Errorf("nbd_group member refused by its NBD socket: %v %s", err, out)
	}

	// nova-compute's user: the API answers, and refuses what the config
	// does not allow.
	if out, err := curl("vmt-nova", "GET", "/v1/health", ""); err != nil || !strings.Contains(out, `"status": "ok"`) {
		t.Errorf("api_group member refused by the API: %v %s", err, out)
	}
	outside := t.TempDir()
	for name, tc := range map[string]struct{ body, key string }{
		"/etc/shadow":            {create("n1", "/etc/shadow", "readonly", ""), "allowed_origin_dirs"},
		"/etc/shadow rw":         {create("n2", "/etc/shadow", "write-through", ""), "allowed_origin_dirs"},
		"symlink escape":         {create("n3", images+"/esc", "readonly", ""), "outside allowed_origin_dirs"},
		"cow_path outside":       {create("n4", img, "cow", outside+"/vm.img"), "allowed_cow_dirs"},
		"cow_path over a file":   {create("n5", img, "cow", "/etc/vmt-cow.img"), "allowed_cow_dirs"},
		"cow_path in state_dir/": {create("n6", img, "cow", e.cfg.StateDir+"/exports.json"), "allowed_cow_dirs"},
	} {
		out, err := curl("vmt-nova", "POST", "/v1/exports", tc.body)
		if err != nil || !strings.Contains(out, "HTTP 403") || !strings.Contains(out, `"code": "forbidden"`) || !strings.Contains(out, tc.key) {
			t.Errorf("%s: want 403 forbidden naming %s, got %v %s", name, tc.key, err, out)
		}
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Errorf("files made outside allowed_cow_dirs: %v", ents)
	}
	// An allowed export works for it, and it cannot open NBD sockets.
	out, err := curl("vmt-nova", "POST", "/v1/exports", create("n7", img, "cow", ""))
	if err != nil || !strings.Contains(out, "HTTP 201") {
		t.Errorf("allowed create as api_group member: %v %s", err, out)
	}
	if out, err := runAs(t, "vmt-nova", "nbdinfo", "--size", x.URI); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("api_group member opened an NBD socket: %s", out)
	}

	// Everyone else: neither.
	if out, err := runAs(t, "nobody", "curl", "-sS", "--max-time", "10", "--unix-socket", e.cfg.APISocket, "http://vmthunder/v1/health"); err == nil || !strings.Contains(out, "Couldn't connect") {
		t.Errorf("nobody reached the API: %v %s", err, out)
	}
	if out, err := runAs(t, "nobody", "nbdinfo", "--size", x.URI); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("nobody opened the NBD export: %s", out)
	}

	// Only what root and nova made exists.
	var ids []string
	for _, x := range e.d.List() {
		ids = append(ids, x.ID)
	}
	if strings.Join(ids, ",") != "n7,vm1" {
		t.Errorf("exports %v, want n7,vm1", ids)
	}
}
