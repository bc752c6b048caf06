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

// An iscsi:// URL the parser refuses (here: no /iqn/lun) still carries its
// credentials; the daemon derives and logs the base id before it opens the
// origin, so the id must not hold the password (nor depend on it).
func TestDeriveBaseIDUnparsableISCSIURLKeepsPasswordOut(t *testing.T) {
	for _, u := range []string{
		"iscsi://user%s3cretpw@host",
		"iscsi://user%s3cretpw@",
		"iscsi://user%s3cretpw@host/iqn/notalun",
	} {
		id, err := DeriveBaseID(origin.Spec{URL: u})
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(id, "s3cretpw") {
			t.Errorf("DeriveBaseID(%q) = %q: holds the password", u, id)
		}
		other, _ := DeriveBaseID(origin.Spec{URL: strings.Replace(u, "s3cretpw", "other", 1)})
		if other != id {
			t.Errorf("base id of %q depends on the password: %q vs %q", u, id, other)
		}
	}
}
