package stack

import (
	"strings"
	"testing"

	"github.com/vmthunder/vmthunder/sidecar/origin"
)

func TestDeriveBaseIDKeepsPasswordsOutAndIgnoresPortal(t *testing.T) {
	a, err := DeriveBaseID(origin.Spec{URL: "iscsi://user%pa55word@127.0.0.1:3260/iqn.2026-11.org.x:vol/1"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := DeriveBaseID(origin.Spec{URL: "iscsi://127.0.0.2:3261/iqn.2026-11.org.x:vol/1"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(a, "pa55word") || a != b {
		t.Fatalf("base ids %q and %q: want equal and without the password", a, b)
	}
	c, _ := DeriveBaseID(origin.Spec{URL: "iscsi://127.0.0.1:3260/iqn.2026-11.org.x:vol/2"})
	if c == a {
		t.Fatal("different LUNs share a base id")
	}
}
