package config

import (
	"strings"
	"testing"
)

func TestCinderAbsentIsNil(t *testing.T) {
	c, warn, err := Load(write(t, "[DEFAULT]\nstate_dir = /var/lib/vmthunder\n"))
	if err != nil || len(warn) > 0 {
		t.Fatal(err, warn)
	}
	if c.Cinder != nil {
		t.Fatalf("no [cinder] section, got %+v", c.Cinder)
	}
}

func TestCinderNoAuth(t *testing.T) {
	c, warn, err := Load(write(t, `[cinder]
auth_strategy = noauth
endpoint = http://192.0.2.5:8776/v3/
project_id = admin
template_volume_type = vmthunder-template
host = node-1
initiator = iqn.2026-11.org.example:node-1
`))
	if err != nil || len(warn) > 0 {
		t.Fatal(err, warn)
	}
	cc := c.Cinder
	if cc == nil || cc.AuthStrategy != CinderNoAuth || cc.Endpoint != "http://192.0.2.5:8776/v3/admin" || cc.ProjectID != "admin" ||
		cc.TemplateVolumeType != "vmthunder-template" || cc.Host != "node-1" || cc.Initiator != "iqn.2026-11.org.example:node-1" {
		t.Fatalf("%+v", cc)
	}
	// The project id may end the endpoint instead.
	c, _, err = Load(write(t, "[cinder]\nauth_strategy = noauth\nendpoint = http://h:8776/v3/p1\n"))
	if err != nil || c.Cinder.ProjectID != "p1" || c.Cinder.Endpoint != "http://h:8776/v3/p1" || c.Cinder.Host == "" || c.Cinder.Initiator == "" {
		t.Fatalf("%v %+v", err, c.Cinder)
	}
}

func TestCinderKeystone(t *testing.T) {
	c, _, err := Load(write(t, `[cinder]
auth_url = https://keystone.example:5000/v3
username = vmthunder
password = s3cret
project_name = service
region_name = RegionOne
`))
	if err != nil {
		t.Fatal(err)
	}
	cc := c.Cinder
	if cc.AuthStrategy != CinderKeystone || cc.UserDomainName != "Default" || cc.ProjectDomainName != "Default" || cc.RegionName != "RegionOne" {
		t.Fatalf("%+v", cc)
	}
	c, _, err = Load(write(t, "[cinder]\nauth_url = http://k:5000/v3\napplication_credential_id = abc\napplication_credential_secret = s3cret\n"))
	if err != nil || c.Cinder.ApplicationCredentialID != "abc" {
		t.Fatalf("%v %+v", err, c.Cinder)
	}
}

// Every mistake names the key, and no message repeats a password.
func TestCinderErrorsNameTheKey(t *testing.T) {
	for body, want := range map[string]string{
		"auth_strategy = token\n":                                          "[cinder] auth_strategy",
		"auth_strategy = noauth\n":                                         "[cinder] endpoint",
		"auth_strategy = noauth\nendpoint = http://h/v3\n":                 "[cinder] project_id",
		"auth_strategy = noauth\nendpoint = ftp://h/v3/p\n":                "[cinder] endpoint",
		"auth_strategy = noauth\nendpoint = http://u:s3cret@h/v3/p\n":      "[cinder] endpoint",
		"username = u\npassword = s3cret\nproject_name = p\n":              "[cinder] auth_url",
		"auth_url = http://k/v3\npassword = s3cret\nproject_name = p\n":    "[cinder] username",
		"auth_url = http://k/v3\nusername = u\nproject_name = p\n":         "[cinder] password",
		"auth_url = http://k/v3\nusername = u\npassword = s3cret\n":        "[cinder] project_name",
		"auth_url = http://k/v3\napplication_credential_secret = s3cret\n": "[cinder] application_credential_id",
		"auth_url = http://k/v3\napplication_credential_id = a\n":          "[cinder] application_credential_secret",
		"auth_url = http://k/v3\napplication_credential_id = a\napplication_credential_secret = s3cret\nusername = u\npassword = s3cret\n": "[cinder] application_credential_id",
		"auth_strategy = noauth\nendpoint = http://h/v3/p\ninitiator = node1\n":                                                            "[cinder] initiator",
	} {
		_, _, err := Load(write(t, "[cinder]\n"+body))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error naming %s", body, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%q: error shows the password: %v", body, err)
		}
	}
}

func TestCinderUnknownKeyWarns(t *testing.T) {
	_, warn, err := Load(write(t, "[cinder]\nauth_strategy = noauth\nendpoint = http://h/v3/p\npasword = x\n"))
	if err != nil || len(warn) != 1 || !strings.Contains(warn[0], "pasword") {
		t.Fatal(err, warn)
	}
}
