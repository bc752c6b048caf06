package daemon

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
)

// wantForbidden asserts err is a 403 forbidden naming every string in want.
func wantForbidden(t *testing.T, what string, err error, want ...string) {
	t.Helper()
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusForbidden || ae.Code != api.CodeForbidden {
		t.Errorf("%s: got %v, want 403 forbidden", what, err)
		return
	}
	for _, w := range want {
		if !strings.Contains(ae.Message, w) {
			t.Errorf("%s: message %q does not name %q", what, ae.Message, w)
		}
	}
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// Local origins come only from allowed_origin_dirs, after symlinks and
// ".." are resolved; anything else is 403 forbidden naming the key.
func TestAccessOrigins(t *testing.T) {
	var imgs string
	e := newEnv(t, func(c *config.Config) {
		imgs = filepath.Join(filepath.Dir(c.StateDir), "images")
		c.AllowedOriginDirs = []string{imgs}
	})
	if err := os.Mkdir(imgs, 0o755); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(imgs, "a.raw")
	if err := os.WriteFile(good, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	outside, _ := e.image("outside.raw", 1<<20) // in e.dir, not in imgs
	mustSymlink(t, "/etc/shadow", filepath.Join(imgs, "shadow"))
	mustSymlink(t, "/etc", filepath.Join(imgs, "etc"))
	mustSymlink(t, "../outside.raw", filepath.Join(imgs, "rel"))
	mustSymlink(t, "a.raw", filepath.Join(imgs, "inside"))
	mustSymlink(t, "/proc/self/root/etc/shadow", filepath.Join(imgs, "proc"))
	if err := os.Mkdir(filepath.Join(imgs, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct{ origin, mode string }{
		{"/etc/shadow", api.ModeReadOnly},
		{"/etc/shadow", api.ModeWriteThrough},
		{imgs + "/../../../../../etc/shadow", api.ModeReadOnly}, // ".." cleaned away
		{imgs + "/sub/../../outside.raw", api.ModeReadOnly},
		{outside, api.ModeCOW},
	} {
		_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: tc.origin, Mode: tc.mode})
		wantForbidden(t, tc.origin, err, "allowed_origin_dirs", imgs)
	}
	// Symlinks in an allowed directory pointing out of it.
	for _, p := range []string{imgs + "/shadow", imgs + "/etc/shadow", imgs + "/etc/passwd", imgs + "/rel"} {
		_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: p, Mode: api.ModeReadOnly})
		wantForbidden(t, p, err, "resolves to", "outside allowed_origin_dirs")
	}
	// /proc's magic links are never followed.
	_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: imgs + "/proc", Mode: api.ModeReadOnly})
	wantForbidden(t, "via /proc", err, "/proc")
	// A directory is not a disk.
	_, err = e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: imgs + "/sub", Mode: api.ModeReadOnly})
	wantForbidden(t, "directory", err, "not a regular file")

	// Inside: the file itself, and a symlink that stays inside.
	for i, p := range []string{good, imgs + "/inside"} {
		x, err := e.c.Create(ctx(t), api.CreateRequest{ID: "ok" + string(rune('0'+i)), Origin: p, Mode: api.ModeReadOnly})
		if err != nil || x.Size != 1<<20 {
			t.Fatalf("%s: %v %+v", p, err, x)
		}
	}
	if l := e.d.List(); len(l) != 2 {
		t.Errorf("%d exports, want the 2 allowed ones: %+v", len(l), l)
	}

	// A warm-up opens its origin the same way.
	_, err = e.c.Warm(ctx(t), "tmpl", &api.WarmRequest{Origin: "/etc/shadow", Generation: "1"})
	wantForbidden(t, "warm /etc/shadow", err, "allowed_origin_dirs")
	_, err = e.c.Warm(ctx(t), "tmpl", &api.WarmRequest{Origin: imgs + "/shadow", Generation: "1"})
	wantForbidden(t, "warm symlink escape", err, "outside allowed_origin_dirs")

	// iSCSI origins are not local paths: not refused by the check (they
	// may still fail to connect).
	for _, r := range []Record{
		{ID: "i", Origin: "iscsi://127.0.0.1:1/iqn.2010-10.org.example:vol/0", Mode: api.ModeReadOnly},
		{ID: "j", ConnectionInfo: map[string]any{"target_portal": "127.0.0.1:1", "target_iqn": "iqn.2010-10.org.example:v", "target_lun": 0}, Mode: api.ModeReadOnly},
	} {
		if err := e.d.checkAccess(r); err != nil {
			t.Errorf("%+v: %v", r, err)
		}
	}
}

// A path is refused when a directory on its way could be changed by a
// user other than root: the file could be swapped between check and open.
func TestAccessUntrustedDirectories(t *testing.T) {
	e := newEnv(t, nil)
	okImg, _ := e.image("ok.raw", 4096)
	shared := filepath.Join(e.dir, "shared")
	owned := filepath.Join(e.dir, "owned")
	for _, d := range []string{shared, owned} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "a.raw"), make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(owned, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{shared + "/a.raw", owned + "/a.raw"} {
		_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: p, Mode: api.ModeReadOnly})
		wantForbidden(t, p, err, "directory "+filepath.Dir(p))
	}
	// A COW store may be in a directory another user owns (Nova's
	// instances directory; cowdir.go), not in one everyone may write.
	_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: okImg, Mode: api.ModeCOW, CowPath: shared + "/vm.img"})
	wantForbidden(t, "world-writable cow dir", err, "directory "+shared)
	if _, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: okImg, Mode: api.ModeCOW, CowPath: owned + "/vm.img"}); err != nil {
		t.Errorf("cow store in a directory nobody owns: %v", err)
	}
	// Sticky and root's (like /tmp, where e.dir is): fine for an entry
	// root owns.
	sticky := filepath.Join(e.dir, "sticky")
	if err := os.Mkdir(sticky, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sticky, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sticky, "a.raw"), make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Create(ctx(t), api.CreateRequest{ID: "s", Origin: sticky + "/a.raw", Mode: api.ModeReadOnly}); err != nil {
		t.Errorf("root's file in a sticky directory: %v", err)
	}
	os.Chown(filepath.Join(sticky, "a.raw"), 65534, 65534)
	_, err = e.c.Create(ctx(t), api.CreateRequest{ID: "s2", Origin: sticky + "/a.raw", Mode: api.ModeReadOnly})
	wantForbidden(t, "nobody's file in a sticky directory", err, "directory "+sticky)
}

// Block devices only through allowed_origin_devices globs, and only if
// they are block devices.
func TestAccessDevices(t *testing.T) {
	var devDir string
	e := newEnv(t, func(c *config.Config) {
		devDir = filepath.Join(filepath.Dir(c.StateDir), "dev")
		c.AllowedOriginDevices = []string{devDir + "/by-path/ip-*-iscsi-*-lun-*", "/dev/nul*"}
		c.AllowedOriginDirs = nil
	})
	if err := os.MkdirAll(devDir+"/by-path", 0o755); err != nil {
		t.Fatal(err)
	}
	// A block device node (loop, never opened here) and udev-style names.
	if err := syscall.Mknod(devDir+"/sdz", syscall.S_IFBLK|0o600, int(7<<8|200)); err != nil {
		t.Fatal(err)
	}
	lun := devDir + "/by-path/ip-10.0.0.1:3260-iscsi-iqn.2010-10.org.example:vol-lun-0"
	mustSymlink(t, "../sdz", lun)
	notDev := devDir + "/by-path/ip-10.0.0.1:3260-iscsi-iqn.2010-10.org.example:file-lun-1"
	if err := os.WriteFile(notDev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	check := func(p string) error {
		return e.d.checkAccess(Record{ID: "d", Origin: p, Mode: api.ModeReadOnly})
	}
	if err := check(lun); err != nil {
		t.Errorf("by-path name of a block device: %v", err)
	}
	wantForbidden(t, "block device not matching", check(devDir+"/sdz"), "allowed_origin_devices")
	wantForbidden(t, "regular file matching", check(notDev), "not a block device")
	wantForbidden(t, "character device matching", check("/dev/null"), "not a block device")
	wantForbidden(t, "host disk", check("/dev/loop0"), "allowed_origin_devices")
	// Through the API: the same answer.
	_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "d", Origin: devDir + "/sdz", Mode: api.ModeWriteThrough})
	wantForbidden(t, "api", err, "allowed_origin_devices")

	// The default admits only kernel-iSCSI LUN names.
	d := config.Defaults()
	for p, want := range map[string]bool{
		"/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2010-10.org.openstack:volume-1-lun-1": true,
		"/dev/disk/by-path/pci-0000:00:1f.2-ata-1":                                          false,
		"/dev/disk/by-id/ata-SAMSUNG_SSD":                                                   false,
		"/dev/sda":                                                                          false,
		"/dev/disk/by-path/ip-x-iscsi-y-lun-0/../../../sda":                                 false,
	} {
		got := false
		for _, g := range d.AllowedOriginDevices {
			ok, _ := filepath.Match(g, filepath.Clean(p))
			got = got || ok
		}
		if got != want {
			t.Errorf("default allowed_origin_devices on %s: %v, want %v", p, got, want)
		}
	}
}

// COW stores only in allowed_cow_dirs, never through a symlink, and the
// daemon creates nothing outside.
func TestAccessCow(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.AllowedCowDirs = nil }) // default: state_dir/cow
	img, _ := e.image("a.raw", 1<<20)
	cowDir := filepath.Join(e.cfg.StateDir, "cow")
	if st, err := os.Stat(cowDir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state_dir/cow: %v %v", st, err)
	}
	out := t.TempDir()
	victim := filepath.Join(out, "victim")
	if err := os.WriteFile(victim, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	mustSymlink(t, out, filepath.Join(cowDir, "link"))
	mustSymlink(t, victim, filepath.Join(cowDir, "store.img"))
	mustSymlink(t, filepath.Join(out, "new"), filepath.Join(cowDir, "dangling.img"))
	for _, tc := range []struct {
		cow  string
		want string
	}{
		{filepath.Join(out, "vm.img"), "allowed_cow_dirs"},
		{filepath.Join(out, "sub", "vm.img"), "allowed_cow_dirs"},
		{"/etc/vmt-test.img", "allowed_cow_dirs"},
		{filepath.Join(e.cfg.StateDir, "exports.json"), "allowed_cow_dirs"},
		{cowDir, "allowed_cow_dirs"},
		{cowDir + "/link/vm.img", "follows no symlinks"},
		{cowDir + "/store.img", "follows no symlinks"},
		{cowDir + "/dangling.img", "follows no symlinks"},
	} {
		_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "x", Origin: img, Mode: api.ModeCOW, CowPath: tc.cow})
		wantForbidden(t, tc.cow, err, tc.want)
	}
	// A persisted record is not cleaned by the API's decoder: ".." is
	// resolved before the check.
	_, err := e.d.checkCow(cowDir + "/../exports.json")
	wantForbidden(t, "cow ..", err, "allowed_cow_dirs")
	ents, _ := os.ReadDir(out)
	if len(ents) != 1 {
		t.Errorf("the daemon created files outside allowed_cow_dirs: %v", ents)
	}
	// Refused before a create marks a new store (which a failed create or
	// the next start would remove).
	if marks, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "creating")); len(marks) != 0 {
		t.Errorf("create markers left for refused stores: %v", marks)
	}
	if st, _ := os.Stat(victim); st.Size() != 0 {
		t.Errorf("victim grown to %d", st.Size())
	}
	if _, err := os.Stat("/etc/vmt-test.img"); err == nil {
		t.Error("created /etc/vmt-test.img")
	}
	// Inside, in a new subdirectory, and the default path.
	for id, cow := range map[string]string{"a": cowDir + "/inst/a.img", "b": ""} {
		x, err := e.c.Create(ctx(t), api.CreateRequest{ID: id, Origin: img, Mode: api.ModeCOW, CowPath: cow})
		if err != nil {
			t.Fatalf("cow %q: %v", cow, err)
		}
		if cow == "" && x.CowPath != cowDir+"/b.img" {
			t.Errorf("default cow_path %s", x.CowPath)
		}
	}
}

// A persisted export the config no longer allows comes back in state
// error with the refusal; delete_cow=true will not remove its store
// outside allowed_cow_dirs, and deleting it without delete_cow works.
func TestAccessRestartAndDeleteCow(t *testing.T) {
	e := newEnv(t, nil) // allowed_cow_dirs: e.dir
	img, _ := e.image("a.raw", 1<<20)
	keep := filepath.Join(e.dir, "keep", "vm.img")
	if _, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm", Origin: img, Mode: api.ModeCOW, CowPath: keep}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Create(ctx(t), api.CreateRequest{ID: "ro", Origin: img, Mode: api.ModeReadOnly}); err != nil {
		t.Fatal(err)
	}
	e.stop()
	e.cfg.AllowedCowDirs = []string{filepath.Join(e.cfg.StateDir, "cow")}
	e.cfg.AllowedOriginDirs = []string{filepath.Join(e.dir, "images")}
	e.start()
	for id, want := range map[string]string{"vm": "allowed_origin_dirs", "ro": "allowed_origin_dirs"} {
		x, err := e.c.Get(ctx(t), id)
		if err != nil {
			t.Fatal(err)
		}
		if x.State != stateError || !strings.Contains(x.Error, want) || !strings.Contains(x.Error, "forbidden") {
			t.Errorf("%s after restart: state %s error %q", id, x.State, x.Error)
		}
	}
	// With the origin allowed again, the cow store is what is refused.
	e.stop()
	e.cfg.AllowedOriginDirs = []string{e.dir}
	e.start()
	x, _ := e.c.Get(ctx(t), "vm")
	if x.State != stateError || !strings.Contains(x.Error, "allowed_cow_dirs") {
		t.Errorf("vm after restart: state %s error %q", x.State, x.Error)
	}
	// The retry loop keeps it refused.
	time.Sleep(3 * e.d.RetryInterval)
	if x, _ := e.c.Get(ctx(t), "vm"); x.State != stateError {
		t.Errorf("retried into state %s", x.State)
	}
	err := e.c.Delete(ctx(t), "vm", true)
	wantForbidden(t, "delete_cow outside", err, "allowed_cow_dirs", keep)
	for _, p := range []string{keep, keep + ".bitmap"} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("delete_cow outside allowed_cow_dirs removed %s: %v", p, err)
		}
	}
	if err := e.c.Delete(ctx(t), "vm", false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("delete without delete_cow removed the store: %v", err)
	}
}

// Without api_group the API socket is root's alone (0600); the API socket
// may not be in nbd_socket_dir.
func TestAccessAPISocketDefault(t *testing.T) {
	e := newEnv(t, nil)
	st, err := os.Stat(e.cfg.APISocket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Sys().(*syscall.Stat_t).Gid != 0 {
		t.Errorf("api socket mode %v gid %d, want 0600 root", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid)
	}
	dst, _ := os.Stat(filepath.Dir(e.cfg.APISocket))
	if dst.Mode().Perm() != 0o711 { // nbd_socket_dir is below it: search only
		t.Errorf("api socket directory mode %v, want 0711", dst.Mode().Perm())
	}
	c := config.Defaults()
	c.APISocket = "/run/vmt-x/nbd/api.sock"
	c.NBDSocketDir = "/run/vmt-x/nbd"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "nbd_socket_dir") {
		t.Errorf("api socket in nbd_socket_dir: %v", err)
	}
}

// An allowed_cow_dirs entry outside state_dir belongs to its owner (Nova's
// instances directory): the daemon starts without it and makes nothing
// there; a store in it is refused until it exists, then accepted.
func TestForeignCowDirMissingAtStart(t *testing.T) {
	var inst string
	e := newEnv(t, func(c *config.Config) {
		inst = filepath.Join(filepath.Dir(c.StateDir), "instances")
		c.AllowedCowDirs = []string{inst}
	})
	if _, err := os.Lstat(inst); !os.IsNotExist(err) {
		t.Fatalf("the daemon made %s (%v): only its own directories are made", inst, err)
	}
	if !strings.Contains(e.log.String(), "stores there are refused until it exists") {
		t.Errorf("no warning about the missing directory in the log:\n%s", e.log.String())
	}
	img, _ := e.image("a.raw", 1<<20)
	c := ctx(t)
	if _, err := e.c.Create(c, api.CreateRequest{ID: "a", Origin: img, Mode: api.ModeCOW, CowPath: filepath.Join(inst, "a.img")}); err == nil {
		t.Fatal("a store in a missing allowed directory was created")
	}
	if err := os.Mkdir(inst, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Create(c, api.CreateRequest{ID: "a", Origin: img, Mode: api.ModeCOW, CowPath: filepath.Join(inst, "a.img")}); err != nil {
		t.Fatalf("store in the allowed directory once it exists: %v", err)
	}
}
