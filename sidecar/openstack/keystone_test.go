package openstack

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/openstack/openstacktest"
)

// Keystone auth as deployed: a real Keystone 30 issues the token (password
// or application credential) and its catalog names Cinder's endpoint in
// the configured region; calls then reach the real Cinder with that token.
// A wrong password or region fails with Keystone's reason, never the
// password.
func TestKeystoneAuthReachesCinder(t *testing.T) {
	cl := openstacktest.StartCinder(t)
	cinderBase := cl.Endpoint[:strings.LastIndex(cl.Endpoint, "/")] // project-less: http://HOST:PORT/v3
	ks := openstacktest.StartKeystone(t, cinderBase)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	conf := func(mod func(*config.Cinder)) *config.Cinder {
		cc := &config.Cinder{AuthURL: ks.AuthURL, Username: ks.Username, Password: ks.Password, ProjectName: ks.Project,
			RegionName: ks.Region, TemplateVolumeType: cl.TemplateVolumeType, Host: "ks-node", Initiator: "iqn.2026-11.org.vmthunder:ks-node"}
		if mod != nil {
			mod(cc)
		}
		if key, why := cc.Validate(); key != "" {
			t.Fatalf("[cinder] %s: %s", key, why)
		}
		return cc
	}

	c, err := New(ctx, conf(nil))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSuffix(c.Endpoint(), "/"); got != cinderBase {
		t.Fatalf("endpoint from the catalog %s, want %s", got, cinderBase)
	}
	v, err := c.CreateVolume(ctx, CreateOpts{Name: "ks-volume", SizeGiB: 1, VolumeType: cl.TemplateVolumeType})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitStatus(ctx, v.ID, 2*time.Minute, nil, "available"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}

	app, err := New(ctx, conf(func(cc *config.Cinder) {
		cc.Username, cc.Password, cc.ProjectName = "", "", ""
		cc.ApplicationCredentialID, cc.ApplicationCredentialSecret = ks.AppCredID, ks.AppSecret
	}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := app.Templates(ctx, ""); err != nil {
		t.Fatalf("templates with an application credential: %v", err)
	}

	override := cinderBase + "/" + cl.ProjectID
	o, err := New(ctx, conf(func(cc *config.Cinder) { cc.Endpoint = override }))
	if err != nil || strings.TrimSuffix(o.Endpoint(), "/") != override {
		t.Fatalf("endpoint override: %v %v", err, o)
	}

	_, err = New(ctx, conf(func(cc *config.Cinder) { cc.Password = "wrong-pass-1234" }))
	var e *Error
	if !errors.As(err, &e) || e.Status != 401 || strings.Contains(err.Error(), "wrong-pass-1234") || strings.Contains(err.Error(), ks.Password) {
		t.Errorf("wrong password: %v", err)
	}
	_, err = New(ctx, conf(func(cc *config.Cinder) { cc.RegionName = "Elsewhere" }))
	if err == nil || !strings.Contains(err.Error(), "Elsewhere") {
		t.Errorf("unknown region: %v", err)
	}
}
