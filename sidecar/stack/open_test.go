package stack_test

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/internal/tgt"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

// OpenOrigin reaches the iscsi origin from a URL and from connection_info.
func TestOpenOrigin(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 4 << 20, CHAPUser: "u1", CHAPPassword: "pw-123456789"})
	want, _ := os.ReadFile(tg.BackingFile)
	for _, spec := range []origin.Spec{
		{URL: tg.URL(0), ReadOnly: true},
		{ConnectionInfo: tg.ConnectionInfo()},
	} {
		if s := spec.String(); strings.Contains(s, "pw-123") || !strings.Contains(s, "iscsi://u1%***@") {
			t.Fatalf("Spec.String leaks or mangles: %s", s)
		}
		d, err := stack.OpenOrigin(spec)
		if err != nil {
			t.Fatalf("stack.OpenOrigin(%s): %v", spec, err)
		}
		got := make([]byte, len(want))
		if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("read through stack.OpenOrigin(%s): %v", spec, err)
		}
		if d.Caps().ReadOnly != spec.ReadOnly {
			t.Fatalf("caps %+v for %s", d.Caps(), spec)
		}
		d.Close()
	}
	_, err := stack.OpenOrigin(origin.Spec{URL: "iscsi://h/iqn"})
	if !errors.Is(err, origin.ErrBadSpec) {
		t.Fatalf("bad URL: %v", err)
	}
	bad := tg.ConnectionInfo()
	bad["auth_password"] = "nope-nope-nope"
	if _, err := stack.OpenOrigin(origin.Spec{ConnectionInfo: bad}); !errors.Is(err, iscsi.ErrAuth) {
		t.Fatalf("bad CHAP through stack.OpenOrigin: %v", err)
	}
}
