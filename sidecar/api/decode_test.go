package api

import (
	"errors"
	"net/http"
	"strings"
	"testing"
)

func TestDecodeCreateOK(t *testing.T) {
	for _, body := range []string{
		`{"id":"vm-1","origin":"/var/lib/images/a.raw","mode":"cow"}`,
		`{"id":"vm.2","origin":"/dev/sdb","mode":"readonly","base":"tmpl-7","generation":"sha256:ab12"}`,
		`{"id":"vol_3","origin":"iscsi://10.0.0.1:3260/iqn.2010-10.org.openstack:volume-3/1","mode":"write-through"}`,
		`{"id":"v4","mode":"cow","cow_path":"/srv/cow/v4.img","connection_info":{"target_portal":"10.0.0.1:3260","target_iqn":"iqn.2010-10.org.openstack:volume-4","target_lun":1,"auth_method":"CHAP","auth_username":"u","auth_password":"secret"}}`,
		`{"id":"v5","mode":"readonly","connection_info":{"driver_volume_type":"iscsi","data":{"target_portal":"10.0.0.1:3260","target_iqn":"iqn.2010-10.org.openstack:volume-5","target_lun":0}}}`,
		`{"id":"v6","mode":"cow","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","cow_path":"/var/lib/nova/instances/x/disk.vmt"}`,
		`{"id":"v7","mode":"readonly","template_volume":"0B3C7E4E-2F1A-4C5D-9E8F-123456789ABC"}`,
	} {
		req, err := DecodeCreate(strings.NewReader(body))
		if err != nil {
			t.Errorf("%s: %v", body, err)
			continue
		}
		if req.ConnectionInfo != nil && req.ConnectionInfo["target_iqn"] == nil {
			t.Errorf("%s: connection_info not unwrapped: %v", body, req.ConnectionInfo)
		}
	}
}

// Every malformed request is a 4xx *Error whose code and message name the
// cause.
func TestDecodeCreateErrors(t *testing.T) {
	for _, tc := range []struct {
		body, code, msg string
	}{
		{``, CodeBadJSON, "empty"},
		{`{"id":"a",`, CodeBadJSON, "malformed JSON"},
		{`{"id":"a"}{"id":"b"}`, CodeBadJSON, "after the request"},
		{`[1,2]`, CodeBadJSON, "want a JSON object"},
		{`{"id":5,"origin":"/x","mode":"cow"}`, CodeBadJSON, `"id"`},
		{`{"id":"a","origin":"/x","mode":"cow","colour":"red"}`, CodeUnknownField, `"colour"`},
		{`{"origin":"/x","mode":"cow"}`, CodeMissingField, `"id"`},
		{`{"id":"a","origin":"/x"}`, CodeMissingField, `"mode"`},
		{`{"id":"a","mode":"cow"}`, CodeMissingField, `"origin"`},
		{`{"id":"a/b","origin":"/x","mode":"cow"}`, CodeInvalid, "invalid id"},
		{`{"id":"..","origin":"/x","mode":"cow"}`, CodeInvalid, "invalid id"},
		{`{"id":"a","origin":"/x","mode":"rw"}`, CodeInvalid, `unknown mode "rw"`},
		{`{"id":"a","origin":"relative/x","mode":"cow"}`, CodeBadOrigin, "not an absolute path"},
		{`{"id":"a","origin":"http://h/x","mode":"cow"}`, CodeBadOrigin, "unsupported URL scheme"},
		{`{"id":"a","origin":"iscsi://10.0.0.1/","mode":"cow"}`, CodeBadOrigin, "iscsi URL"},
		{`{"id":"a","origin":"iscsi://u%hunter2@10.0.0.1/notaniqn/x","mode":"cow"}`, CodeBadOrigin, "notaniqn"},
		{`{"id":"a","origin":"/x","connection_info":{"target_portal":"h:1"},"mode":"cow"}`, CodeInvalid, "not both"},
		{`{"id":"a","connection_info":{"target_iqn":"iqn.x"},"mode":"cow"}`, CodeBadOrigin, "target_portal"},
		{`{"id":"a","connection_info":{"target_portal":"h:1","target_iqn":"bogus","target_lun":0},"mode":"cow"}`, CodeBadOrigin, "bad target IQN"},
		{`{"id":"a","origin":"iscsi://h/iqn.20x0-01.org.x:y/0","mode":"cow"}`, CodeBadOrigin, "bad target IQN"},
		{`{"id":"a","origin":"iscsi://h/iqn.2010-01.Org_x:y/0","mode":"cow"}`, CodeBadOrigin, "naming authority"},
		{`{"id":"a","connection_info":{"driver_volume_type":"rbd","data":{}},"mode":"cow"}`, CodeBadOrigin, "rbd"},
		{`{"id":"a","origin":"/x","mode":"cow","base":"a b"}`, CodeInvalid, "invalid base"},
		{`{"id":"a","origin":"/x","mode":"cow","base":"img"}`, CodeMissingField, "generation"},
		{`{"id":"a","origin":"/x","mode":"cow","generation":"1"}`, CodeInvalid, "without a base"},
		{`{"id":"a","origin":"/x","mode":"write-through","base":"img","generation":"1"}`, CodeInvalid, "template"},
		{`{"id":"a","template_volume":"not-a-uuid","mode":"cow"}`, CodeInvalid, "not a Cinder volume id"},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","mode":"write-through"}`, CodeInvalid, "want cow or readonly"},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","origin":"/x","mode":"cow"}`, CodeInvalid, `"origin", not both`},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","connection_info":{"target_portal":"h:1"},"mode":"cow"}`, CodeInvalid, `"connection_info", not both`},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","base":"b","mode":"cow"}`, CodeInvalid, `"base", not both`},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","generation":"g","mode":"cow"}`, CodeInvalid, `"generation", not both`},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","mode":"readonly","cow_path":"/x/y"}`, CodeInvalid, "only for mode cow"},
		{`{"id":"a","template_volume":"0b3c7e4e-2f1a-4c5d-9e8f-123456789abc","mode":"cow","cow_path":"x/y"}`, CodeInvalid, "not an absolute path"},
		{`{"id":"a","origin":"/x","mode":"readonly","cow_path":"/c"}`, CodeInvalid, "only for mode cow"},
		{`{"id":"a","origin":"/x","mode":"cow","cow_path":"c.img"}`, CodeInvalid, "absolute"},
		{`{"id":"a","origin":"/x","mode":"cow","cow_path":"/a/../c.img"}`, CodeInvalid, "clean"},
	} {
		_, err := DecodeCreate(strings.NewReader(tc.body))
		var ae *Error
		if !errors.As(err, &ae) {
			t.Errorf("%s: want *Error, got %v", tc.body, err)
			continue
		}
		if ae.Status != http.StatusBadRequest || ae.Code != tc.code || !strings.Contains(ae.Message, tc.msg) {
			t.Errorf("%s: got %d %s %q; want 400 %s containing %q", tc.body, ae.Status, ae.Code, ae.Message, tc.code, tc.msg)
		}
		if strings.Contains(ae.Message, "hunter2") {
			t.Errorf("%s: error leaks the password: %q", tc.body, ae.Message)
		}
	}
	big := `{"id":"a","origin":"/` + strings.Repeat("x", MaxBody) + `","mode":"cow"}`
	_, err := DecodeCreate(strings.NewReader(big))
	var ae *Error
	if !errors.As(err, &ae) || ae.Status != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: %v", err)
	}
}

func TestDecodeWarm(t *testing.T) {
	if r, err := DecodeWarm(strings.NewReader("")); err != nil || r.Origin != "" {
		t.Errorf("empty body: %v %v", r, err)
	}
	if r, err := DecodeWarm(strings.NewReader(`{"origin":"/img"}`)); err != nil || r.Origin != "/img" {
		t.Errorf("origin: %v %v", r, err)
	}
	for _, b := range []string{`{"orign":"/img"}`, `{"origin":"img"}`, `{`} {
		if _, err := DecodeWarm(strings.NewReader(b)); err == nil {
			t.Errorf("%s: no error", b)
		}
	}
}

func TestDescribeOriginHidesPassword(t *testing.T) {
	s := DescribeOrigin("iscsi://admin%hunter2@10.0.0.1:3260/iqn.2010-10.org.x:v/0", nil)
	ci := DescribeOrigin("", map[string]any{"target_portal": "10.0.0.1:3260", "target_iqn": "iqn.2010-10.org.x:v",
		"target_lun": 0, "auth_method": "CHAP", "auth_username": "admin", "auth_password": "hunter2"})
	for _, d := range []string{s, ci} {
		if strings.Contains(d, "hunter2") || !strings.Contains(d, "admin") {
			t.Errorf("DescribeOrigin = %q", d)
		}
	}
}

// FuzzDecodeCreate: the decoder never panics, a failure is always a 4xx
// *Error, and an accepted request keeps the invariants the daemon relies on.
func FuzzDecodeCreate(f *testing.F) {
	for _, s := range []string{
		`{"id":"vm-1","origin":"/img.raw","mode":"cow"}`,
		`{"id":"v","mode":"readonly","connection_info":{"target_portal":"h:3260","target_iqn":"iqn.a:b","target_lun":"1"}}`,
		`{"id":"v","mode":"cow","origin":"iscsi://u%p@h/iqn.a:b/0","cow_path":"/c/d"}`,
		`{"id":"a","origin":"/x","mode":"cow","x":1}`,
		`{"id":"a",`, `null`, `"str"`, `{}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := DecodeCreate(strings.NewReader(string(body)))
		if err != nil {
			var ae *Error
			if !errors.As(err, &ae) || ae.Status < 400 || ae.Status > 499 || ae.Code == "" || ae.Message == "" {
				t.Fatalf("error is not a 4xx *Error: %#v", err)
			}
			return
		}
		if ValidID(req.ID) != nil || (req.Origin == "") == (req.ConnectionInfo == nil) {
			t.Fatalf("accepted a request that breaks the invariants: %+v", req)
		}
		switch req.Mode {
		case ModeCOW, ModeReadOnly, ModeWriteThrough:
		default:
			t.Fatalf("accepted mode %q", req.Mode)
		}
		if req.CowPath != "" && (req.Mode != ModeCOW || !strings.HasPrefix(req.CowPath, "/")) {
			t.Fatalf("accepted cow_path %q in mode %s", req.CowPath, req.Mode)
		}
	})
}
