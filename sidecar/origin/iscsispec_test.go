package origin

import (
	"errors"
	"strings"
	"testing"
)

func TestParseURL(t *testing.T) {
	s, err := ParseISCSIURL("iscsi://alice%p@ss/w%rd@10.0.0.5:3261/iqn.2010-10.org.openstack%3Avolume-1/2")
	if err != nil {
		t.Fatal(err)
	}
	if s.User != "alice" || s.Password != "p@ss/w%rd" {
		t.Fatalf("credentials %q %q", s.User, s.Password)
	}
	want := Portal{Addr: "10.0.0.5:3261", IQN: "iqn.2010-10.org.openstack:volume-1", LUN: 2}
	if len(s.Portals) != 1 || s.Portals[0] != want {
		t.Fatalf("portals %+v", s.Portals)
	}
	if str := s.String(); strings.Contains(str, "p@ss") || !strings.Contains(str, "alice%***@10.0.0.5:3261") {
		t.Fatalf("String leaks or mangles: %s", str)
	}
	s, err = ParseISCSIURL("iscsi://[fd00::1]/iqn.x/0")
	if err != nil || s.Portals[0].Addr != "[fd00::1]:3260" || s.User != "" {
		t.Fatalf("v6 default port: %+v %v", s, err)
	}
	for _, bad := range []string{
		"iscsi://host/iqn", "iscsi://host/iqn/x", "iscsi:///iqn/1", "http://h/iqn/1",
		"iscsi://user@host/iqn/1", "iscsi://h:99999/iqn/1", "iscsi://h/iqn/-1",
	} {
		if _, err := ParseISCSIURL(bad); !errors.Is(err, ErrBadSpec) {
			t.Errorf("%s: want ErrBadSpec, got %v", bad, err)
		}
	}
	if _, err := ParseISCSIURL("iscsi://u%secret@h/iqn/x"); err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("error leaks the password: %v", err)
	}
	if r := RedactURL("iscsi://u%secret@h/iqn/1"); r != "iscsi://u%***@h/iqn/1" {
		t.Fatalf("redact: %s", r)
	}
	// libiscsi also takes user:password: parse it, and never echo it.
	s, err = ParseISCSIURL("iscsi://alice:topsecret@10.0.0.5/iqn.x/1")
	if err != nil || s.User != "alice" || s.Password != "topsecret" {
		t.Fatalf("user:password form: %+v %v", s, err)
	}
	if _, err := ParseISCSIURL("iscsi://alice:topsecret@10.0.0.5/iqn.x/x"); err == nil || strings.Contains(err.Error(), "topsecret") {
		t.Fatalf("error leaks the password: %v", err)
	}
	if r := RedactURL("iscsi://alice:topsecret@h/iqn/1"); strings.Contains(r, "topsecret") {
		t.Fatalf("redact: %s", r)
	}
	// The target's secret (mutual CHAP) as libiscsi takes it.
	if _, err := ParseISCSIURL("iscsi://u%p@h/iqn/x?target_user=t&target_password=tsecret"); err == nil || strings.Contains(err.Error(), "tsecret") {
		t.Fatalf("error leaks the target password: %v", err)
	}
	if r := RedactURL("iscsi://h/iqn/1?target_password=tsecret&header_digest=none"); r != "iscsi://h/iqn/1?target_password=***&header_digest=none" {
		t.Fatalf("redact: %s", r)
	}
}

func TestParseConnectionInfo(t *testing.T) {
	// Single path, LUN as a JSON number, CHAP.
	s, err := ParseConnectionInfo(map[string]any{
		"target_portal": "192.168.1.10:3260", "target_iqn": "iqn.a:b", "target_lun": float64(1),
		"auth_method": "CHAP", "auth_username": "u", "auth_password": "pw",
		"target_discovered": false, "volume_id": "v",
	})
	if err != nil || len(s.Portals) != 1 || s.Portals[0] != (Portal{"192.168.1.10:3260", "iqn.a:b", 1}) || s.User != "u" || s.Password != "pw" {
		t.Fatalf("%+v %v", s, err)
	}
	// Multipath lists, LUNs as strings and ints, portal without port.
	s, err = ParseConnectionInfo(map[string]any{
		"target_portals": []any{"10.0.0.1:3260", "10.0.0.2"},
		"target_iqns":    []string{"iqn.a:1", "iqn.a:2"},
		"target_luns":    []any{"3", 4},
		"target_portal":  "10.0.0.1:3260", "target_iqn": "iqn.a:1", "target_lun": 3,
	})
	if err != nil || len(s.Portals) != 2 || s.Portals[1] != (Portal{"10.0.0.2:3260", "iqn.a:2", 4}) || s.Portals[0].LUN != 3 {
		t.Fatalf("%+v %v", s, err)
	}
	for _, bad := range []map[string]any{
		{},
		{"target_portal": "h", "target_iqn": "i"},
		{"target_portal": "h", "target_iqn": "i", "target_lun": 1.5},
		{"target_portal": "h", "target_iqn": "i", "target_lun": 1, "auth_method": "kerberos"},
		{"target_portals": "h", "target_iqn": "i", "target_lun": 1},
		{"target_portal": "h", "target_iqn": "i", "target_lun": 1, "auth_method": "CHAP", "auth_username": "u"},
	} {
		if _, err := ParseConnectionInfo(bad); !errors.Is(err, ErrBadSpec) {
			t.Errorf("%v: want ErrBadSpec, got %v", bad, err)
		}
	}
}

// Mutual CHAP is refused, in connection_info and in libiscsi's URL form,
// without echoing the secret.
func TestMutualCHAPRefused(t *testing.T) {
	base := func() map[string]any {
		return map[string]any{"target_portal": "10.0.0.1:3260", "target_iqn": "iqn.2010-10.org.x:v", "target_lun": 1,
			"auth_method": "CHAP", "auth_username": "u", "auth_password": "p"}
	}
	for _, k := range []string{"target_username", "target_password", "auth_username_in", "auth_password_in", "mutual_chap_secret"} {
		ci := base()
		ci[k] = "t0ps3cret"
		_, err := ParseConnectionInfo(ci)
		if !errors.Is(err, ErrBadSpec) || !strings.Contains(err.Error(), "mutual CHAP") || strings.Contains(err.Error(), "t0ps3cret") {
			t.Errorf("%s: %v", k, err)
		}
	}
	for _, u := range []string{
		"iscsi://u%p@10.0.0.1/iqn.2010-10.org.x:v/1?target_user=t&target_password=t0ps3cret",
		"iscsi://10.0.0.1/iqn.2010-10.org.x:v/1?header_digest=crc32c",
	} {
		_, err := ParseISCSIURL(u)
		if !errors.Is(err, ErrBadSpec) || strings.Contains(err.Error(), "t0ps3cret") {
			t.Errorf("%s: %v", u, err)
		}
	}
}
