package tgt

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The harness target must be sane for an initiator nobody here wrote:
// libiscsi's own iscsi-ls and iscsi-inq see it on every portal.
func TestHarnessInterop(t *testing.T) {
	tg := Start(t, Options{Size: 8 << 20, Portals: 2})
	if len(tg.Portals) != 2 || tg.Portals[0] == tg.Portals[1] {
		t.Fatalf("portals %v", tg.Portals)
	}
	for i, p := range tg.Portals {
		out, err := exec.Command("iscsi-ls", "-s", "iscsi://"+p).CombinedOutput()
		if err != nil {
			t.Fatalf("iscsi-ls portal %d: %v: %s", i, err, out)
		}
		if !strings.Contains(string(out), "Target:"+tg.IQN) || !strings.Contains(string(out), "Lun:1") || !strings.Contains(string(out), "DIRECT_ACCESS") {
			t.Fatalf("iscsi-ls portal %d did not list the LUN:\n%s", i, out)
		}
		out, err = exec.Command("iscsi-inq", tg.URL(i)).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "DIRECT_ACCESS") {
			t.Fatalf("iscsi-inq %s: %v:\n%s", tg.URL(i), err, out)
		}
	}
	// Killing one portal's daemon leaves the other serving.
	tg.KillPortal(0)
	if out, err := exec.Command("iscsi-inq", tg.URL(0)).CombinedOutput(); err == nil {
		t.Fatalf("portal 0 still answers after KillPortal:\n%s", out)
	}
	if out, err := exec.Command("iscsi-inq", tg.URL(1)).CombinedOutput(); err != nil {
		t.Fatalf("portal 1 died with portal 0: %v\n%s", err, out)
	}
}

func TestHarnessCHAPAndContent(t *testing.T) {
	tg := Start(t, Options{Size: 4 << 20, CHAPUser: "alice", CHAPPassword: "s3cret-pass-12"})
	if out, err := exec.Command("iscsi-inq", tg.URL(0)).CombinedOutput(); err != nil {
		t.Fatalf("iscsi-inq with CHAP: %v\n%s", err, out)
	}
	bad := strings.Replace(tg.URL(0), "s3cret", "wrong", 1)
	out, err := exec.Command("iscsi-inq", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Authentication failure") {
		t.Fatalf("wrong CHAP secret accepted or unclear: %v\n%s", err, out)
	}
	// The backing file is random, not zeroes, so byte-exact tests mean something.
	b, err := os.ReadFile(tg.BackingFile)
	if err != nil || len(b) != 4<<20 || bytes.Equal(b[:4096], make([]byte, 4096)) {
		t.Fatalf("backing file: len %d err %v", len(b), err)
	}
}
