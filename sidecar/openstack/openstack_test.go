package openstack

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/gophercloud/gophercloud/v2"
)

// Cinder's and Keystone's error bodies give their message, not the JSON.
func TestErrorCarriesCinderMessage(t *testing.T) {
	for body, want := range map[string]string{
		`{"itemNotFound": {"code": 404, "message": "Volume 42 could not be found."}}`:                                        "Volume 42 could not be found.",
		`{"badRequest": {"code": 400, "message": "Invalid input received:\n  bad  mode"}}`:                                   "Invalid input received: bad mode",
		`{"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made requires authentication."}}`: "requires authentication",
		`<html>502 Bad Gateway</html>`: "<html>502 Bad Gateway</html>",
		``:                             "(no message)",
	} {
		err := wrap("get volume 42", gophercloud.ErrUnexpectedResponseCode{Actual: 404, Body: []byte(body)})
		var e *Error
		if !errors.As(err, &e) || e.Status != 404 || !strings.Contains(e.Error(), want) || !strings.Contains(e.Error(), "get volume 42") {
			t.Errorf("%q: %v, want %q", body, err, want)
		}
	}
	if !IsNotFound(wrap("x", gophercloud.ErrUnexpectedResponseCode{Actual: 404})) || IsNotFound(wrap("x", errors.New("dial"))) {
		t.Error("IsNotFound")
	}
	long := wrap("x", gophercloud.ErrUnexpectedResponseCode{Actual: 500, Body: []byte(strings.Repeat("a", 5000))})
	if len(long.Error()) > 600 {
		t.Errorf("a long body is not cut: %d bytes", len(long.Error()))
	}
}

// An answer past MaxAnswer is an error, not a truncated body.
func TestBoundedBody(t *testing.T) {
	b := &boundedBody{rc: io.NopCloser(strings.NewReader(strings.Repeat("x", MaxAnswer+1))), left: MaxAnswer}
	if _, err := io.ReadAll(b); !errors.Is(err, errTooLarge) {
		t.Fatalf("oversized answer: %v", err)
	}
	b = &boundedBody{rc: io.NopCloser(strings.NewReader(strings.Repeat("x", MaxAnswer))), left: MaxAnswer}
	if got, err := io.ReadAll(b); err != nil || len(got) != MaxAnswer {
		t.Fatalf("answer of exactly MaxAnswer: %d %v", len(got), err)
	}
}

// An attachment's connection_info (Cinder merges the driver's data beside
// driver_volume_type) becomes what the origin parser reads.
func TestISCSIData(t *testing.T) {
	ci := map[string]any{"driver_volume_type": "iscsi", "target_portal": "192.0.2.1:3260", "target_iqn": "iqn.2010-10.org.openstack:volume-1",
		"target_lun": 1, "auth_method": "CHAP", "auth_username": "u", "auth_password": "s3cret", "access_mode": "ro",
		"attachment_id": "a", "enforce_multipath": false, "volume_id": "v"}
	d, err := ISCSIData(ci)
	if err != nil || d["driver_volume_type"] != nil || d["target_iqn"] != "iqn.2010-10.org.openstack:volume-1" {
		t.Fatalf("%v %v", d, err)
	}
	nested := map[string]any{"driver_volume_type": "iscsi", "data": map[string]any{"target_portal": "192.0.2.1:3260", "target_iqn": "iqn.2010-10.org.openstack:v", "target_lun": 0}}
	if _, err := ISCSIData(nested); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []map[string]any{
		nil,
		{"driver_volume_type": "rbd", "name": "pool/vol"},
		{"driver_volume_type": "iscsi", "target_iqn": "iqn.2010-10.org.openstack:v"},
		{"driver_volume_type": "iscsi", "target_portal": "h:3260", "target_iqn": "iqn.2010-10.org.openstack:v", "target_lun": 0, "auth_method": "CHAP", "auth_username": "u", "auth_password": "s3cret", "target_password": "x"},
	} {
		if _, err := ISCSIData(bad); err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%v: %v", bad, err)
		}
	}
}

func TestParseTemplate(t *testing.T) {
	gen := "sha256:" + strings.Repeat("ab", 32)
	good := func() *Volume {
		return &Volume{ID: "0b3c7e4e-2f1a-4c5d-9e8f-123456789abc", Name: "cirros", Status: "in-use", Size: 1,
			CreatedAt: time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC),
			Metadata:  map[string]string{MetaTemplate: "1", MetaGeneration: gen, MetaSize: "21233664", MetaChunkSize: "1048576", MetaImageID: "img"}}
	}
	tm, err := ParseTemplate(good())
	if err != nil || tm.Generation != gen || tm.Size != 21233664 || tm.ChunkSize != 1<<20 || tm.ImageID != "img" || tm.CreatedAt != "2026-12-01T10:00:00Z" || tm.Status != "in-use" {
		t.Fatalf("%+v %v", tm, err)
	}
	for key, val := range map[string]string{
		MetaTemplate:   "0",
		MetaGeneration: "md5:abc",
		MetaSize:       "2147483648", // more than the 1 GiB volume
		MetaChunkSize:  "3000",
	} {
		v := good()
		v.Metadata[key] = val
		if _, err := ParseTemplate(v); !errors.Is(err, ErrNotTemplate) {
			t.Errorf("%s=%s: %v", key, val, err)
		}
	}
}
