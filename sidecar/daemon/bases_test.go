package daemon

import (
	"bytes"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/internal/tgt"
)

func wantCode(t *testing.T, what string, err error, code string) {
	t.Helper()
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != code {
		t.Fatalf("%s: %v, want %s", what, err, code)
	}
}

func rewrite(t *testing.T, path string) []byte {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, st.Size())
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// Detach, change the volume from outside, attach again (same id, or
// another id on the same origin): the new bytes are served, never the
// cache of the old ones.
func TestReattachAfterOutsideChange(t *testing.T) {
	e := newEnv(t, nil)
	img, data := e.image("vol.raw", 2<<20)
	c := ctx(t)
	for _, mode := range []string{api.ModeReadOnly, api.ModeCOW, api.ModeWriteThrough} {
		x, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: mode})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(nbdRead(t, x.URI), data) {
			t.Fatalf("%s: first attach", mode)
		}
		if err := e.c.Delete(c, "vm1", true); err != nil {
			t.Fatal(err)
		}
		data = rewrite(t, img)
		for _, id := range []string{"vm1", "vm2"} {
			y, err := e.c.Create(c, api.CreateRequest{ID: id, Origin: img, Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			if y.Base != x.Base {
				t.Errorf("one volume, two bases: %s %s", x.Base, y.Base)
			}
			if !bytes.Equal(nbdRead(t, y.URI), data) {
				t.Fatalf("%s: re-attach as %s served the bytes from before the change", mode, id)
			}
			if err := e.c.Delete(c, id, true); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := os.Stat(filepath.Join(e.cfg.CacheDir, x.Base)); !os.IsNotExist(err) {
			t.Errorf("%s: volume cache kept after its last export: %v", mode, err)
		}
	}
	// A daemon restart drops volume caches left by a crash too: plant one.
	x, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	nbdRead(t, x.URI)
	e.stop()
	// Put the table back as a crash would leave it, without the export.
	os.WriteFile(e.d0StatePath(), []byte(`{"version":1,"exports":[]}`), 0o600)
	os.MkdirAll(filepath.Join(e.cfg.CacheDir, x.Base), 0o700)
	os.WriteFile(filepath.Join(e.cfg.CacheDir, x.Base, "bitmap"), []byte("left"), 0o600)
	e.start()
	if _, err := os.Stat(filepath.Join(e.cfg.CacheDir, x.Base)); !os.IsNotExist(err) {
		t.Errorf("volume cache left by a crash kept at start: %v", err)
	}
	if !strings.Contains(e.log.String(), "dropped a volume cache") {
		t.Error("the drop is not logged")
	}
}

func (e *env) d0StatePath() string { return filepath.Join(e.cfg.StateDir, "exports.json") }

// A base names one content: a template over two origins, or a template
// written through, is refused; a template of a new generation gets a new
// cache.
func TestTwoOriginsOneBase(t *testing.T) {
	e := newEnv(t, nil)
	a, dataA := e.image("a.raw", 1<<20)
	b, dataB := e.image("b.raw", 1<<20)
	c := ctx(t)
	_, err := e.c.Create(c, api.CreateRequest{ID: "w", Origin: a, Mode: api.ModeWriteThrough, Base: "shared", Generation: "1"})
	wantCode(t, "write-through over a template", err, api.CodeInvalid)

	x, err := e.c.Create(c, api.CreateRequest{ID: "x", Origin: a, Mode: api.ModeCOW, Base: "shared", Generation: "1"})
	if err != nil {
		t.Fatal(err)
	}
	nbdRead(t, x.URI)
	_, err = e.c.Create(c, api.CreateRequest{ID: "y", Origin: b, Mode: api.ModeCOW, Base: "shared", Generation: "1"})
	wantCode(t, "same template over another origin", err, api.CodeBaseConflict)

	// A new generation of the template (its new origin): its own cache.
	y, err := e.c.Create(c, api.CreateRequest{ID: "y", Origin: b, Mode: api.ModeCOW, Base: "shared", Generation: "2"})
	if err != nil {
		t.Fatal(err)
	}
	if y.Base == x.Base || !bytes.Equal(nbdRead(t, y.URI), dataB) || !bytes.Equal(nbdRead(t, x.URI), dataA) {
		t.Fatal("two generations share a cache or serve each other's bytes")
	}
	// Once generation 1's exports are gone, its cache is kept for the
	// next export of it from that origin, and rebuilt for any other.
	e.c.Delete(c, "x", true)
	e.c.Delete(c, "y", true)
	z, err := e.c.Create(c, api.CreateRequest{ID: "z", Origin: b, Mode: api.ModeReadOnly, Base: "shared", Generation: "1"})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(nbdRead(t, z.URI), dataB) {
		t.Fatal("generation 1 from another origin served the first origin's cache")
	}
	if !strings.Contains(e.log.String(), "base cache emptied before use") {
		t.Error("the rebuild is not logged")
	}
}

// A write-through export and a readonly or cow export of one volume cannot
// share its base: the cow export's base would move under it.
func TestMixedModesOneVolume(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("vol.raw", 1<<20)
	c := ctx(t)
	if _, err := e.c.Create(c, api.CreateRequest{ID: "wt", Origin: img, Mode: api.ModeWriteThrough}); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{api.ModeCOW, api.ModeReadOnly} {
		_, err := e.c.Create(c, api.CreateRequest{ID: "other", Origin: img, Mode: mode})
		wantCode(t, mode+" beside write-through", err, api.CodeBaseConflict)
	}
	// A second write-through user of the volume (multi-attach) is fine.
	if _, err := e.c.Create(c, api.CreateRequest{ID: "wt2", Origin: img, Mode: api.ModeWriteThrough}); err != nil {
		t.Fatal(err)
	}
	e.c.Delete(c, "wt", false)
	e.c.Delete(c, "wt2", false)
	if _, err := e.c.Create(c, api.CreateRequest{ID: "ro", Origin: img, Mode: api.ModeReadOnly}); err != nil {
		t.Fatal(err)
	}
	_, err := e.c.Create(c, api.CreateRequest{ID: "wt", Origin: img, Mode: api.ModeWriteThrough})
	wantCode(t, "write-through beside readonly", err, api.CodeBaseConflict)
}

// Extend (Cinder grows the LUN while it is detached), then attach: the
// export has the new size and the old cache is not in the way.
func TestExtendThenAttach(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("vol.raw", 1<<20)
	c := ctx(t)
	for _, mode := range []string{api.ModeWriteThrough, api.ModeCOW, api.ModeReadOnly} {
		x, err := e.c.Create(c, api.CreateRequest{ID: "v", Origin: img, Mode: mode})
		if err != nil {
			t.Fatal(err)
		}
		nbdRead(t, x.URI)
		e.c.Delete(c, "v", true)
		st, _ := os.Stat(img)
		if err := os.Truncate(img, st.Size()+1<<20); err != nil {
			t.Fatal(err)
		}
		y, err := e.c.Create(c, api.CreateRequest{ID: "v", Origin: img, Mode: mode})
		if err != nil {
			t.Fatalf("%s: attach after extend: %v", mode, err)
		}
		if y.Size != st.Size()+1<<20 {
			t.Fatalf("%s: size %d after extend to %d", mode, y.Size, st.Size()+1<<20)
		}
		want, _ := os.ReadFile(img)
		if !bytes.Equal(nbdRead(t, y.URI), want) {
			t.Fatalf("%s: extended volume reads wrong", mode)
		}
		e.c.Delete(c, "v", true)
	}
}

// One LUN opened as an iscsi:// URL and as Cinder connection_info is one
// base: one cache, and a re-attach after the LUN changed serves the new
// bytes.
func TestURLAndConnectionInfoOneBase(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 4 << 20, CHAPUser: "u1", CHAPPassword: "pw-123456789"})
	e := newEnv(t, nil)
	c := ctx(t)
	x, err := e.c.Create(c, api.CreateRequest{ID: "by-url", Origin: tg.URL(0), Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	y, err := e.c.Create(c, api.CreateRequest{ID: "by-ci", ConnectionInfo: tg.ConnectionInfo(), Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	if x.Base != y.Base {
		t.Fatalf("one LUN, two bases: %s and %s", x.Base, y.Base)
	}
	want, _ := os.ReadFile(tg.BackingFile)
	if !bytes.Equal(nbdRead(t, x.URI), want) {
		t.Fatal("read by URL")
	}
	st, _ := e.c.Stats(c)
	before := st.OriginBytes
	if !bytes.Equal(nbdRead(t, y.URI), want) {
		t.Fatal("read by connection_info")
	}
	if st, _ = e.c.Stats(c); st.OriginBytes != before {
		t.Errorf("the second export fetched %d bytes again: not one cache", st.OriginBytes-before)
	}
	e.c.Delete(c, "by-url", false)
	e.c.Delete(c, "by-ci", false)
	want = rewrite(t, tg.BackingFile)
	z, err := e.c.Create(c, api.CreateRequest{ID: "by-ci", ConnectionInfo: tg.ConnectionInfo(), Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(nbdRead(t, z.URI), want) {
		t.Fatal("re-attach after the LUN changed served stale bytes")
	}
}

// What a crash leaves that no export owns is removed at start: a socket
// file, and the cow store of a create that never finished.
func TestStartReconciles(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("vol.raw", 1<<20)
	c := ctx(t)
	if _, err := e.c.Create(c, api.CreateRequest{ID: "kept", Origin: img, Mode: api.ModeCOW}); err != nil {
		t.Fatal(err)
	}
	e.stop()
	orphanSock := filepath.Join(e.cfg.NBDSocketDir, "orphan.sock")
	if ln, err := net.Listen("unix", orphanSock); err == nil {
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
	}
	store := filepath.Join(e.cfg.StateDir, "cow", "crashed.img")
	os.WriteFile(store, []byte("x"), 0o600)
	os.WriteFile(store+".bitmap", []byte("x"), 0o600)
	os.MkdirAll(filepath.Join(e.cfg.StateDir, "creating"), 0o700)
	os.WriteFile(filepath.Join(e.cfg.StateDir, "creating", "crashed"), []byte(store), 0o600)
	e.start()
	for _, p := range []string{orphanSock, store, store + ".bitmap"} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s kept at start: %v", p, err)
		}
	}
	if x, err := e.c.Get(c, "kept"); err != nil || x.State != "ready" {
		t.Fatalf("owned export after reconcile: %+v %v", x, err)
	}
	if _, err := os.Stat(filepath.Join(e.cfg.StateDir, "cow", "kept.img")); err != nil {
		t.Fatalf("owned store removed: %v", err)
	}
	for _, want := range []string{"socket file no export owns", "create that did not finish"} {
		if !strings.Contains(e.log.String(), want) {
			t.Errorf("log does not say %q", want)
		}
	}
}

// A table naming one id twice is refused with a clear error.
func TestDuplicateIDsRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.stop()
	os.WriteFile(e.d0StatePath(), []byte(`{"version":1,"exports":[{"id":"a","origin":"/x","base":"b","mode":"readonly"},{"id":"a","origin":"/y","base":"b","mode":"readonly"}]}`), 0o600)
	d, err := New(e.cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Start(); err == nil || !strings.Contains(err.Error(), `"a" twice`) {
		t.Fatalf("start with a duplicate id: %v", err)
	}
}

// Close while a create is still logging in to its target: the daemon
// waits for it, and nothing serves the export's socket after Close.
func TestCloseWaitsForSlowCreate(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 1 << 20})
	e := newEnv(t, nil)
	if err := tg.Signal(0, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	created := make(chan error, 1)
	go func() {
		_, err := e.c.Create(ctx(t), api.CreateRequest{ID: "slow", Origin: tg.URL(0), Mode: api.ModeReadOnly})
		created <- err
	}()
	time.Sleep(500 * time.Millisecond) // the create is in its login
	closed := make(chan struct{})
	go func() { e.stop(); close(closed) }()
	// Longer than Close gives the API's handlers (5 s): the create outlives
	// the API server.
	time.Sleep(6 * time.Second)
	tg.Signal(0, syscall.SIGCONT)
	select {
	case <-closed:
	case <-time.After(60 * time.Second):
		t.Fatal("Close did not return")
	}
	t.Logf("create: %v", <-created)
	sock := filepath.Join(e.cfg.NBDSocketDir, "slow.sock")
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		t.Fatal("the slow create's export is served after Close")
	}
}

// Deleting an export with its cow store while another create asks for the
// same cow_path: the new export either is refused (the path is still
// taken) or gets a store of its own that the delete does not remove; it
// never sees the old export's writes.
func TestDeleteCOWRacingCreate(t *testing.T) {
	e := newEnv(t, nil)
	img, data := e.image("base.raw", 1<<20)
	store := filepath.Join(e.cfg.StateDir, "cow", "shared.img")
	c := ctx(t)
	for i := 0; i < 20; i++ {
		a, err := e.c.Create(c, api.CreateRequest{ID: "a", Origin: img, Mode: api.ModeCOW, CowPath: store})
		if err != nil {
			t.Fatal(err)
		}
		qemuIO(t, a.URI, "write -P 0x5a 0 65536", "flush")
		done := make(chan error, 1)
		go func() { done <- e.c.Delete(c, "a", true) }()
		b, err := e.c.Create(c, api.CreateRequest{ID: "b", Origin: img, Mode: api.ModeCOW, CowPath: store})
		if derr := <-done; derr != nil {
			t.Fatal(derr)
		}
		if err != nil {
			wantCode(t, "create on a cow_path being deleted", err, api.CodeConflict)
			continue
		}
		if !bytes.Equal(nbdRead(t, b.URI), data) {
			t.Fatalf("round %d: the new export sees the deleted export's writes", i)
		}
		if _, err := os.Stat(store + ".bitmap"); err != nil {
			t.Fatalf("round %d: the delete removed the new export's store: %v", i, err)
		}
		if err := e.c.Delete(c, "b", true); err != nil {
			t.Fatal(err)
		}
	}
}
