package daemon

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
)

// novaUser is the uid and gid of vmt-nova (in group vmt-api, the API
// group), an unprivileged user standing for Nova, made if missing.
func novaUser(t *testing.T) (uid, gid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test runs as root (make test does): it creates a user and acts as it")
	}
	ensureUser(t, "vmt-nova", "vmt-api")
	u, err := user.Lookup("vmt-nova")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

// A COW store in a directory a real unprivileged user owns (Nova's
// instances directory, as nova): every symlink, hard link and rename that
// user can make there is refused or harmless; the daemon writes nothing
// outside the directory, and the store is root:api_group 0640, readable
// and not writable by that user.
func TestCowStoreInNovaOwnedDirectory(t *testing.T) {
	uid, gid := novaUser(t)
	var inst string
	e := newEnv(t, func(c *config.Config) {
		c.APIGroup = "vmt-api"
		inst = filepath.Join(filepath.Dir(c.StateDir), "instances")
		if err := os.Mkdir(inst, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(inst, uid, gid); err != nil {
			t.Fatal(err)
		}
		c.AllowedCowDirs = []string{inst}
	})
	if err := os.Chmod(e.dir, 0o755); err != nil { // nova reaches instances/
		t.Fatal(err)
	}
	img, _ := e.image("base.raw", 1<<20)
	// Root's files outside, which the attacks aim at.
	outside := filepath.Join(e.dir, "outside")
	if err := os.Mkdir(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	precious := []byte("root's own data\n")
	victims := map[string]string{}
	for _, n := range []string{"victim", "disk", "disk.bitmap", "hard"} {
		p := filepath.Join(outside, n)
		if err := os.WriteFile(p, precious, 0o600); err != nil {
			t.Fatal(err)
		}
		victims[n] = p
	}
	asNova := func(script string) {
		t.Helper()
		if out, err := runAs(t, "vmt-nova", "sh", "-ec", script); err != nil {
			t.Fatalf("as vmt-nova: %s: %v: %s", script, err, out)
		}
	}
	create := func(id, cow string) (*api.Export, error) {
		return e.c.Create(ctx(t), api.CreateRequest{ID: id, Origin: img, Mode: api.ModeCOW, CowPath: cow})
	}

	// Each instance directory is nova's, made by nova.
	asNova(fmt.Sprintf(`cd %s
mkdir i1 i2 i3 i4 i5 i6 i7
ln -s %s i1/disk                    # the store is a symlink
ln -s %s i2/disk.bitmap             # its bitmap is
ln -s %s i3/disk.bitmap.tmp         # the bitmap's temporary file is
echo mine > i4/disk                 # nova's own file as the store
ln -s %s i5/sub                     # a directory on the way is
`, inst, victims["victim"], victims["victim"], victims["victim"], outside))
	// A hard link to a root file (fs.protected_hardlinks stops nova making
	// one; root makes it here, as if that were off).
	if err := os.Link(victims["hard"], filepath.Join(inst, "i6", "disk")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ cow, want string }{
		{inst + "/i1/disk", "symlink"},
		{inst + "/i2/disk", "symlink"},
		{inst + "/i3/disk", "symlink"},
		{inst + "/i4/disk", "owned by uid"},
		{inst + "/i5/sub/disk", "symlink"},
		{inst + "/i6/disk", "links"},
	} {
		_, err := create("x", tc.cow)
		wantForbidden(t, tc.cow, err, tc.want)
	}

	// A store made there is root:api_group 0640: nova reads it, cannot
	// write it.
	vm, err := create("vm1", inst+"/i7/disk")
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, vm.URI, "write -P 0x61 0 64k", "flush")
	for _, p := range []string{inst + "/i7/disk", inst + "/i7/disk.bitmap"} {
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		s := st.Sys().(*syscall.Stat_t)
		if s.Uid != 0 || int(s.Gid) != e.cfg.APIGID || st.Mode().Perm() != 0o640 || s.Nlink != 1 {
			t.Errorf("%s: %d:%d %v links %d, want 0:%d 0640 1", p, s.Uid, s.Gid, st.Mode().Perm(), s.Nlink, e.cfg.APIGID)
		}
	}
	if out, err := runAs(t, "vmt-nova", "head", "-c", "4", inst+"/i7/disk"); err != nil || out != "aaaa" {
		t.Errorf("nova cannot read its instance's store: %v %q", err, out)
	}
	if out, err := runAs(t, "vmt-nova", "sh", "-c", "echo x >> "+inst+"/i7/disk"); err == nil {
		t.Errorf("nova wrote the store: %s", out)
	}

	// Nova moves the instance directory away and puts a symlink to root's
	// files in its place: restart and delete_cow touch nothing there.
	if err := e.c.Delete(ctx(t), "vm1", false); err != nil {
		t.Fatal(err)
	}
	if _, err := create("vm1", inst+"/i7/disk"); err != nil { // resumed
		t.Fatal(err)
	}
	e.stop()
	asNova(fmt.Sprintf("cd %s && mv i7 i7.moved && ln -s %s i7", inst, outside))
	e.start()
	if x, err := e.c.Get(ctx(t), "vm1"); err != nil || x.State != api.StateError {
		t.Fatalf("vm1 over a swapped directory: %+v %v", x, err)
	}
	err = e.c.Delete(ctx(t), "vm1", true)
	wantForbidden(t, "delete_cow through a swapped directory", err, "symlink")
	if err := e.c.Delete(ctx(t), "vm1", false); err != nil {
		t.Fatal(err)
	}

	// A race: nova keeps re-pointing every name of a store at root's file
	// while exports of it are made and removed.
	asNova(fmt.Sprintf("mkdir %s/race", inst))
	stop := make(chan struct{})
	done := make(chan struct{})
	script := fmt.Sprintf(`cd %s/race
while true; do
  for n in disk disk.bitmap disk.bitmap.tmp; do ln -sfn %s $n.new 2>/dev/null; mv -fT $n.new $n 2>/dev/null || true; done
  for n in disk disk.bitmap disk.bitmap.tmp; do rm -f $n; done
  sleep 0.01
done`, inst, victims["victim"])
	racer := exec.Command("setpriv", "--reuid", "vmt-nova", "--regid", lookupGID(t, "vmt-nova"), "--init-groups", "--", "sh", "-c", script)
	if err := racer.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { <-stop; racer.Process.Kill(); racer.Wait(); close(done) }()
	made := 0
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if x, err := create("race", inst+"/race/disk"); err == nil {
			made++
			qemuIO(t, x.URI, "write -P 0x62 0 4k", "flush")
			e.c.Delete(ctx(t), "race", true)
		}
	}
	close(stop)
	<-done
	t.Logf("%d exports made and written while racing", made)

	for n, p := range victims {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(b, precious) {
			t.Errorf("root's %s changed: %q %v", n, b, err)
		}
	}
	if ents, _ := os.ReadDir(outside); len(ents) != len(victims) {
		t.Errorf("files made outside: %v", ents)
	}
}

// Nova's home (/var/lib/nova) is nova's too, so the allowed directory
// itself can be swapped: it is walked from / without following symlinks,
// and a symlink put in its place is refused.
func TestCowAllowedDirInNovaHome(t *testing.T) {
	uid, gid := novaUser(t)
	var home, inst string
	e := newEnv(t, func(c *config.Config) {
		c.APIGroup = "vmt-api"
		home = filepath.Join(filepath.Dir(c.StateDir), "nova")
		inst = filepath.Join(home, "instances")
		for _, d := range []string{home, inst} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(d, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
		c.AllowedCowDirs = []string{inst}
	})
	if err := os.Chmod(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	img, _ := e.image("base.raw", 1<<20)
	outside := filepath.Join(e.dir, "outside")
	if err := os.Mkdir(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	x, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW, CowPath: inst + "/uuid-1/disk"})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, x.URI, "write -P 0x63 0 4k", "flush")
	if err := e.c.Delete(ctx(t), "vm1", false); err != nil {
		t.Fatal(err)
	}
	// Nova moves instances/ away and points the name at root's directory.
	if out, err := runAs(t, "vmt-nova", "sh", "-ec", fmt.Sprintf("cd %s && mv instances instances.old && ln -s %s instances", home, outside)); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, cow := range []string{inst + "/uuid-1/disk", inst + "/disk"} {
		_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "vm2", Origin: img, Mode: api.ModeCOW, CowPath: cow})
		wantForbidden(t, cow+" through a swapped allowed directory", err, "symlink")
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Errorf("files made outside: %v", ents)
	}
}
