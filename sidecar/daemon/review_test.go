package daemon

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// A cow_path holding a store made for another base size, or a file that
// is not a cow store, is a conflict (409), not an unreachable origin (502).
func TestCreateCowMismatchIsConflict(t *testing.T) {
	e := newEnv(t, nil)
	small, _ := e.image("small.raw", 1<<20)
	big, _ := e.image("big.raw", 2<<20)
	cow := filepath.Join(e.dir, "vm.img")
	if st, b := e.raw("POST", "/v1/exports", `{"id":"a","origin":"`+small+`","mode":"cow","cow_path":"`+cow+`"}`); st != 201 {
		t.Fatalf("create: %d %s", st, b)
	}
	if st, b := e.raw("DELETE", "/v1/exports/a", ""); st != 204 {
		t.Fatalf("delete: %d %s", st, b)
	}
	for _, body := range []string{
		`{"id":"b","origin":"` + big + `","mode":"cow","cow_path":"` + cow + `"}`,
		`{"id":"c","origin":"` + big + `","mode":"cow","cow_path":"` + small + `"}`,
	} {
		st, b := e.raw("POST", "/v1/exports", body)
		var ae api.Error
		json.Unmarshal([]byte(b), &ae)
		if st != 409 || ae.Code != api.CodeConflict {
			t.Errorf("%s: got %d %s, want 409 conflict", body, st, b)
		}
	}
}

// A warm body over 1 MiB is 413 too_large, as for every request.
func TestWarmBodyTooLarge(t *testing.T) {
	e := newEnv(t, nil)
	body := `{"origin":"/x` + strings.Repeat("x", api.MaxBody) + `"}`
	st, b := e.raw("POST", "/v1/bases/b/warm", body)
	var ae api.Error
	json.Unmarshal([]byte(b), &ae)
	if st != 413 || ae.Code != api.CodeTooLarge {
		t.Errorf("got %d %s, want 413 too_large", st, b)
	}
}

// A create that fails after the metrics layer was set up leaves no series
// of the export behind.
func TestFailedCreateLeavesNoMetrics(t *testing.T) {
	e := newEnv(t, nil)
	img, _ := e.image("a.raw", 1<<20)
	// Something that is not a socket sits where the socket goes.
	if err := os.WriteFile(filepath.Join(e.cfg.NBDSocketDir, "ghost.sock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if st, b := e.raw("POST", "/v1/exports", `{"id":"ghost","origin":"`+img+`","mode":"readonly"}`); st < 400 {
		t.Fatalf("create over a non-socket: %d %s", st, b)
	}
	if _, b := e.raw("GET", "/metrics", ""); strings.Contains(b, `export="ghost"`) {
		t.Errorf("metrics of a failed create:\n%s", grepLines(b, `export="ghost"`))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A missing local origin in an allowed directory is a 400, as
// docs/api.md says for local paths (502 is for targets); a directory or a
// character device is never exported (403, access.go).
func TestCreateLocalOriginNotADisk(t *testing.T) {
	e := newEnv(t, nil)
	sub := filepath.Join(e.dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for origin, want := range map[string]int{filepath.Join(e.dir, "missing.img"): 400, sub: 403, "/dev/null": 403} {
		st, b := e.raw("POST", "/v1/exports", `{"id":"x","origin":"`+origin+`","mode":"readonly"}`)
		var ae api.Error
		json.Unmarshal([]byte(b), &ae)
		code := api.CodeOriginError
		if want == 403 {
			code = api.CodeForbidden
		}
		if st != want || ae.Code != code || !strings.Contains(ae.Message, origin) {
			t.Errorf("origin %s: got %d %s, want %d %s", origin, st, b, want, code)
		}
	}
}
