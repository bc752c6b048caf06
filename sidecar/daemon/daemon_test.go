package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// Every bad request is a 4xx with a JSON body naming the cause.
func TestAPIErrors(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("a.raw", 1<<20)
	if st, b := e.raw("POST", "/v1/exports", `{"id":"dup","origin":"`+img+`","mode":"cow"}`); st != 201 {
		t.Fatalf("create: %d %s", st, b)
	}
	for _, tc := range []struct {
		method, path, body string
		status             int
		code, msg          string
	}{
		{"POST", "/v1/exports", `{"id":"x","origin":`, 400, api.CodeBadJSON, "malformed JSON"},
		{"POST", "/v1/exports", `{"id":"x","origin":"` + img + `","mode":"cow","extra":true}`, 400, api.CodeUnknownField, `"extra"`},
		{"POST", "/v1/exports", `{"origin":"` + img + `","mode":"cow"}`, 400, api.CodeMissingField, `"id"`},
		{"POST", "/v1/exports", `{"id":"x","origin":"` + img + `"}`, 400, api.CodeMissingField, `"mode"`},
		{"POST", "/v1/exports", `{"id":"x","origin":"` + img + `","mode":"snapshot"}`, 400, api.CodeInvalid, "unknown mode"},
		{"POST", "/v1/exports", `{"id":"x","origin":"iscsi://127.0.0.1/not-an-iqn/0","mode":"cow"}`, 400, api.CodeBadOrigin, "not-an-iqn"},
		{"POST", "/v1/exports", `{"id":"x","connection_info":{"target_portal":"127.0.0.1:3260","target_iqn":"bogus","target_lun":0},"mode":"cow"}`, 400, api.CodeBadOrigin, "iqn"},
		{"POST", "/v1/exports", `{"id":"x","origin":"ftp://h/x","mode":"cow"}`, 400, api.CodeBadOrigin, "scheme"},
		{"POST", "/v1/exports", `{"id":"x","origin":"/nonexistent/img","mode":"cow"}`, 403, api.CodeForbidden, "allowed_origin_dirs"},
		{"POST", "/v1/exports", `{"id":"dup","origin":"` + img + `","mode":"cow"}`, 409, api.CodeExists, `"dup"`},
		{"POST", "/v1/exports", `{"id":"` + strings.Repeat("z", 120) + `","origin":"` + img + `","mode":"cow"}`, 400, api.CodeInvalid, "107"},
		{"GET", "/v1/exports/nope", "", 404, api.CodeNotFound, `"nope"`},
		{"DELETE", "/v1/exports/nope", "", 404, api.CodeNotFound, `"nope"`},
		{"DELETE", "/v1/exports/dup?delete_cow=maybe", "", 400, api.CodeInvalid, "delete_cow"},
		{"POST", "/v1/exports/nope/refresh", "", 404, api.CodeNotFound, `"nope"`},
		{"POST", "/v1/bases/unknown-base/warm", "", 400, api.CodeMissingField, "origin"},
		{"POST", "/v1/bases/b/warm", `{"origin":"/x","bogus":1}`, 400, api.CodeUnknownField, "bogus"},
		{"GET", "/v1/bases/no-such-base", "", 404, api.CodeNotFound, "no-such-base"},
		{"GET", "/v2/exports", "", 404, api.CodeNotFound, "/v2/exports"},
		{"PUT", "/v1/exports", "", 404, api.CodeNotFound, "PUT"},
	} {
		st, body := e.raw(tc.method, tc.path, tc.body)
		var ae api.Error
		if err := json.Unmarshal([]byte(body), &ae); err != nil {
			t.Errorf("%s %s %s: answer is not JSON: %d %q", tc.method, tc.path, tc.body, st, body)
			continue
		}
		if st != tc.status || ae.Code != tc.code || !strings.Contains(ae.Message, tc.msg) {
			t.Errorf("%s %s %s: got %d %s %q; want %d %s containing %q", tc.method, tc.path, tc.body, st, ae.Code, ae.Message, tc.status, tc.code, tc.msg)
		}
	}
	// Failed creates leave nothing behind.
	l, err := e.c.List(ctx(t))
	if err != nil || len(l) != 1 || l[0].ID != "dup" {
		t.Errorf("list after errors: %v %v", l, err)
	}
}

// The client returns the daemon's message and code.
func TestClientErrors(t *testing.T) {
	e := newEnv(t, nil)
	err := e.c.Delete(ctx(t), "ghost", false)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != 404 || ae.Code != api.CodeNotFound || !strings.Contains(err.Error(), `no export "ghost"`) {
		t.Errorf("delete ghost: %v", err)
	}
}

func TestExportLifecycle(t *testing.T) {
	e := newEnv(t, nil)
	img, data := e.image("base.raw", 4<<20)
	c := ctx(t)
	x, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	wantSock := e.cfg.NBDSocketDir + "/vm1.sock"
	if x.Socket != wantSock || x.URI != "nbd+unix:///vm1?socket="+wantSock || x.ExportName != "vm1" ||
		x.Size != int64(len(data)) || x.State != "ready" || x.CowPath != e.cfg.StateDir+"/cow/vm1.img" || x.Base == "" {
		t.Fatalf("export %+v", x)
	}
	if got := nbdRead(t, x.URI); !bytes.Equal(got, data) {
		t.Fatal("export does not read back as the origin")
	}
	qemuIO(t, x.URI, "write -P 0x5a 65536 8192", "flush")
	got := nbdRead(t, x.URI)
	want := append([]byte(nil), data...)
	copy(want[65536:65536+8192], bytes.Repeat([]byte{0x5a}, 8192))
	if !bytes.Equal(got, want) {
		t.Fatal("cow write not visible")
	}
	if orig, _ := os.ReadFile(img); !bytes.Equal(orig, data) {
		t.Fatal("cow export wrote its origin")
	}
	g, err := e.c.Get(c, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if g.Stats == nil || g.Stats.ReadBytes < 2*uint64(len(data)) || g.Stats.WriteBytes != 8192 || g.Stats.OriginBytes != uint64(len(data)) {
		t.Errorf("stats %+v", g.Stats)
	}
	// A second export of the same origin shares the base cache: nothing
	// more comes from the origin.
	y, err := e.c.Create(c, api.CreateRequest{ID: "vm2", Origin: img, Mode: api.ModeReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	if y.Base != x.Base {
		t.Errorf("bases differ: %s %s", x.Base, y.Base)
	}
	if got := nbdRead(t, y.URI); !bytes.Equal(got, data) {
		t.Fatal("second export differs")
	}
	st, err := e.c.Stats(c)
	if err != nil {
		t.Fatal(err)
	}
	if st.Exports != 2 || st.OriginBytes != uint64(len(data)) || st.CacheHitBytes < uint64(len(data)) {
		t.Errorf("node stats %+v", st)
	}
	if err := e.c.Delete(c, "vm2", false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(y.Socket); !os.IsNotExist(err) {
		t.Errorf("socket of deleted export: %v", err)
	}
	if err := e.c.Delete(c, "vm1", true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(x.CowPath); !os.IsNotExist(err) {
		t.Errorf("cow store after delete_cow: %v", err)
	}
	if l, _ := e.c.List(c); len(l) != 0 {
		t.Errorf("list after delete: %v", l)
	}
}

// The table survives a restart: same socket, same COW store, same cache.
func TestRestartInProcess(t *testing.T) {
	e := newEnv(t, nil)
	img, data := e.image("base.raw", 2<<20)
	c := ctx(t)
	x, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW, Base: "tmpl", Generation: "1"})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, x.URI, "write -P 0x77 0 4096", "flush")
	nbdRead(t, x.URI) // fills the cache
	st, err := os.Stat(e.d.statePath())
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v %v", st, err)
	}
	e.restart()
	y, err := e.c.Get(c, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if y.URI != x.URI || y.CowPath != x.CowPath || y.Base != x.Base || y.Template != "tmpl" || y.Generation != "1" || y.State != "ready" {
		t.Fatalf("after restart %+v", y)
	}
	want := append([]byte(nil), data...)
	copy(want, bytes.Repeat([]byte{0x77}, 4096))
	if got := nbdRead(t, y.URI); !bytes.Equal(got, want) {
		t.Fatal("after restart the export does not serve the same bytes")
	}
	s, _ := e.c.Stats(c)
	if s.OriginBytes != 0 {
		t.Errorf("the cache did not survive the restart: %d bytes from the origin", s.OriginBytes)
	}
}

// An export whose origin is gone at start stays listed as failed and comes
// back by itself once the origin returns.
func TestRestoreRetry(t *testing.T) {
	e := newEnv(t, nil)
	img, data := e.image("base.raw", 1<<20)
	c := ctx(t)
	if _, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeReadOnly}); err != nil {
		t.Fatal(err)
	}
	e.stop()
	if err := os.Rename(img, img+".away"); err != nil {
		t.Fatal(err)
	}
	// The cache of the base holds nothing yet, so the export needs its origin.
	os.RemoveAll(e.cfg.CacheDir)
	e.start()
	x, err := e.c.Get(c, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if x.State != "error" || !strings.Contains(x.Error, "base.raw") {
		t.Fatalf("export with a missing origin: %+v", x)
	}
	if h, _ := e.c.Health(c); h.Status != "ok" || h.Failed != 1 {
		t.Errorf("health %+v", h)
	}
	os.Rename(img+".away", img)
	deadline := time.Now().Add(20 * time.Second)
	for {
		x, err = e.c.Get(c, "vm1")
		if err == nil && x.State == "ready" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("export not back: %+v %v", x, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := nbdRead(t, x.URI); !bytes.Equal(got, data) {
		t.Fatal("restored export differs")
	}
}

func TestWarm(t *testing.T) {
	e := newEnv(t, nil)
	img, data := e.image("tmpl.raw", 3<<20)
	c := ctx(t)
	st, err := e.c.Warm(c, "tmpl", &api.WarmRequest{Origin: img, Generation: "1"})
	if err != nil {
		t.Fatal(err)
	}
	if st.TotalBytes != int64(len(data)) || st.Base == "" {
		t.Errorf("warm status %+v", st)
	}
	deadline := time.Now().Add(30 * time.Second)
	var b *api.Base
	for {
		b, err = e.c.Base(c, st.Base)
		if err != nil {
			t.Fatal(err)
		}
		if b.Warm != nil && b.Warm.State != api.WarmRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("warm-up not done: %+v", b.Warm)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if b.Warm.State != api.WarmDone || b.Warm.DoneBytes != int64(len(data)) || b.Size != int64(len(data)) || b.PresentBytes != int64(len(data)) {
		t.Fatalf("after warm-up: %+v %+v", b, b.Warm)
	}
	// An export of the warmed base reads nothing from the origin.
	x, err := e.c.Create(c, api.CreateRequest{ID: "vm", Origin: img, Base: "tmpl", Generation: "1", Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	if got := nbdRead(t, x.URI); !bytes.Equal(got, data) {
		t.Fatal("warmed export differs")
	}
	if s, _ := e.c.Stats(c); s.OriginBytes != 0 {
		t.Errorf("%d bytes from the origin after a warm-up", s.OriginBytes)
	}
	// A base in use cannot be removed; an unused one can.
	var ae *api.Error
	if err := e.c.DeleteBase(c, st.Base); !errors.As(err, &ae) || ae.Status != http.StatusConflict {
		t.Errorf("delete base in use: %v", err)
	}
	e.c.Delete(c, "vm", true)
	if err := e.c.DeleteBase(c, st.Base); err != nil {
		t.Errorf("delete unused base: %v", err)
	}
}

// Refresh follows a grown write-through origin and refuses a cow export.
func TestRefresh(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("vol.raw", 1<<20)
	c := ctx(t)
	x, err := e.c.Create(c, api.CreateRequest{ID: "vol", Origin: img, Mode: api.ModeWriteThrough})
	if err != nil {
		t.Fatal(err)
	}
	if y, err := e.c.Refresh(c, "vol"); err != nil || y.Size != 1<<20 {
		t.Fatalf("refresh, same size: %+v %v", y, err)
	}
	if err := os.Truncate(img, 2<<20); err != nil {
		t.Fatal(err)
	}
	y, err := e.c.Refresh(c, "vol")
	if err != nil || y.Size != 2<<20 || y.URI != x.URI {
		t.Fatalf("refresh after extend: %+v %v", y, err)
	}
	if out := qemuIO(t, y.URI, "write -P 0x11 1572864 4096", "flush"); !strings.Contains(out, "wrote 4096") {
		t.Errorf("write past the old end: %s", out)
	}
	b, _ := os.ReadFile(img)
	if !bytes.Equal(b[1572864:1572864+4096], bytes.Repeat([]byte{0x11}, 4096)) {
		t.Error("write-through did not reach the origin")
	}

	img2, _ := e.image("tmpl.raw", 1<<20)
	if _, err := e.c.Create(c, api.CreateRequest{ID: "vm", Origin: img2, Mode: api.ModeCOW}); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img2, 2<<20)
	var ae *api.Error
	if _, err := e.c.Refresh(c, "vm"); !errors.As(err, &ae) || ae.Code != api.CodeConflict {
		t.Errorf("refresh of a cow export over a resized base: %v", err)
	}
}

// A CHAP password never appears in answers, errors or logs.
func TestPasswordHidden(t *testing.T) {
	e := newEnv(t, nil)
	const secret = "s3cr3t-hunter2"
	body := `{"id":"v","mode":"readonly","base":"b","generation":"1","connection_info":{"target_portal":"127.0.0.1:1","target_iqn":"iqn.2010-10.org.openstack:volume-1","target_lun":0,"auth_method":"CHAP","auth_username":"admin","auth_password":"` + secret + `"}}`
	st, ans := e.raw("POST", "/v1/exports", body)
	if st < 400 || strings.Contains(ans, secret) {
		t.Errorf("create with unreachable portal: %d %s", st, ans)
	}
	st, ans = e.raw("POST", "/v1/exports", `{"id":"v","mode":"readonly","origin":"iscsi://admin%`+secret+`@127.0.0.1:1/iqn.2010-10.org.openstack:volume-1/0"}`)
	if st < 400 || strings.Contains(ans, secret) {
		t.Errorf("create with URL: %d %s", st, ans)
	}
	if strings.Contains(e.log.String(), secret) {
		t.Errorf("log holds the password:\n%s", e.log.String())
	}
}
