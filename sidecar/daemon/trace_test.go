package daemon

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// A template export records a trace of its reads; the API shows, stops,
// exports, deletes and imports it; a warm-up fills just its chunks; a
// volume has none.
func TestTraceAPI(t *testing.T) {
	e := newEnv(t, nil)
	c := ctx(t)
	img, _ := e.image("t.raw", 4<<20)
	x, err := e.c.Create(c, api.CreateRequest{ID: "vm1", Origin: img, Mode: api.ModeCOW, Base: "tmpl", Generation: "1"})
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, x.URI, "read 1M 4k", "read 0 4k", "read 3M 128k")
	tr, err := e.c.Trace(c, x.Base)
	if err != nil || !tr.Recording || tr.Present {
		t.Fatalf("trace %+v, %v: want a recording under way", tr, err)
	}
	if tr, err = e.c.StopTrace(c, x.Base); err != nil || !tr.Present || tr.Chunks != 4 || tr.ChunkSize != 64<<10 {
		t.Fatalf("stopped trace %+v, %v: want 4 chunks of 64 KiB (16, 0, 48, 49)", tr, err)
	}
	raw, err := e.c.ExportTrace(c, x.Base)
	if err != nil || !strings.HasPrefix(string(raw), "VMTTRACE1") {
		t.Fatalf("export: %q, %v", raw, err)
	}
	if err := e.c.DeleteTrace(c, x.Base); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Trace(c, x.Base); !isStatus(err, http.StatusNotFound) {
		t.Fatalf("a deleted trace: %v", err)
	}
	if _, err := e.c.ImportTrace(c, x.Base, raw[:len(raw)-1]); !isStatus(err, http.StatusBadRequest) {
		t.Fatalf("a damaged import: %v", err)
	}
	if tr, err = e.c.ImportTrace(c, x.Base, raw); err != nil || tr.Chunks != 4 {
		t.Fatalf("import: %+v, %v", tr, err)
	}
	// The metrics name the base.
	if code, body := e.raw("GET", "/metrics", ""); code != 200 || !strings.Contains(body, `vmthunder_prefetch_chunks_total{base="`+x.Base+`"}`) {
		t.Fatalf("metrics %d: no prefetch series for %s", code, x.Base)
	}
	if err := e.c.Delete(c, "vm1", true); err != nil {
		t.Fatal(err)
	}
	if err := e.c.DeleteBase(c, x.Base); err != nil {
		t.Fatal(err)
	}
	// Before any export: the imported trace waits for the base.
	if _, err := e.c.ImportTrace(c, x.Base, raw); err != nil {
		t.Fatal(err)
	}
	st, err := e.c.Warm(c, "tmpl", &api.WarmRequest{Origin: img, Generation: "1", TraceOnly: true})
	if err != nil || st.TotalBytes != 4*64<<10 {
		t.Fatalf("trace-only warm-up %+v, %v: want the trace's 256 KiB", st, err)
	}
	for b, _ := e.c.Base(c, x.Base); b == nil || b.Warm == nil || b.Warm.State == api.WarmRunning; b, _ = e.c.Base(c, x.Base) {
		time.Sleep(10 * time.Millisecond)
	}
	b, err := e.c.Base(c, x.Base)
	// A closed base's present bytes are its blocks on disk (the bitmap's too).
	if err != nil || b.Warm.State != api.WarmDone || b.PresentBytes < 4*64<<10 || b.PresentBytes > 5*64<<10 {
		t.Fatalf("after a trace-only warm-up: %+v %+v, %v", b, b.Warm, err)
	}
	v, err := e.c.Create(c, api.CreateRequest{ID: "vol", Origin: img, Mode: api.ModeCOW})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Trace(c, v.Base); !isStatus(err, http.StatusBadRequest) {
		t.Fatalf("a volume's trace: %v", err)
	}
}

func isStatus(err error, status int) bool {
	ae, ok := err.(*api.Error)
	return ok && ae.Status == status
}
