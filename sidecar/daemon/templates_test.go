package daemon

import (
	"net"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/config"
)

// Without [cinder] the template calls say so (503), and with a Cinder that
// does not answer they are 502 cinder_error; no export is left behind.
func TestTemplatesNeedCinder(t *testing.T) {
	e := newEnv(t, nil)
	vol := "0b3c7e4e-2f1a-4c5d-9e8f-123456789abc"
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/v1/templates", ""},
		{"GET", "/v1/templates?image_id=x", ""},
		{"POST", "/v1/exports", `{"id":"vm1","mode":"cow","template_volume":"` + vol + `"}`},
	} {
		st, body := e.raw(tc.method, tc.path, tc.body)
		if st != 503 || !strings.Contains(body, `"cinder_unconfigured"`) || !strings.Contains(body, "[cinder]") {
			t.Errorf("%s %s: %d %s", tc.method, tc.path, st, body)
		}
	}
	if st, body := e.raw("GET", "/v1/templates?imageid=x", ""); st != 400 || !strings.Contains(body, "image_id") {
		t.Errorf("unknown query parameter: %d %s", st, body)
	}
	if st, body := e.raw("GET", "/v1/templates?image_id=a'b", ""); st != 400 || !strings.Contains(body, `"invalid"`) {
		t.Errorf("image_id with a quote: %d %s", st, body)
	}

	// A port nobody listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	e2 := newEnv(t, func(c *config.Config) {
		c.Cinder = &config.Cinder{AuthStrategy: config.CinderNoAuth, Endpoint: "http://" + addr + "/v3/p", ProjectID: "p", Host: "n1", Initiator: "iqn.2026-11.org.vmthunder:n1"}
	})
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/v1/templates", ""},
		{"POST", "/v1/exports", `{"id":"vm1","mode":"cow","template_volume":"` + vol + `"}`},
	} {
		st, body := e2.raw(tc.method, tc.path, tc.body)
		if st != 502 || !strings.Contains(body, `"cinder_error"`) {
			t.Errorf("%s %s: %d %s", tc.method, tc.path, st, body)
		}
	}
	if l := e2.d.List(); len(l) != 0 {
		t.Errorf("a refused create left exports: %+v", l)
	}
}
