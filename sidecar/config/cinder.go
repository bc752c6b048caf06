package config

import (
	"fmt"
	"net/url"
	"os"
	"strings"

	"gopkg.in/ini.v1"

	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// Cinder is the [cinder] section, in the style of nova.conf's: how the
// daemon and `vmthunder publish` reach Cinder (and Keystone) for template
// volumes. Nil in Config when the file has no [cinder] section.
type Cinder struct {
	// AuthStrategy is "keystone" (the default) or "noauth" (a Cinder
	// started with auth_strategy = noauth: Endpoint is required and the
	// token is "user:project").
	AuthStrategy string
	// Endpoint overrides the catalog's block-storage endpoint (required
	// for noauth). For noauth the project id is its last path element or
	// ProjectID (then appended).
	Endpoint  string
	ProjectID string
	// Keystone: a password or an application credential.
	AuthURL                     string
	Username, Password          string
	UserDomainName              string
	ProjectName                 string
	ProjectDomainName           string
	ApplicationCredentialID     string
	ApplicationCredentialSecret string
	RegionName                  string
	// TemplateVolumeType is the (multiattach) volume type publish creates
	// templates with.
	TemplateVolumeType string
	// Host and Initiator are this node's connector in attachments: the
	// host name (default os.Hostname) and its iSCSI initiator IQN (default
	// /etc/iscsi/initiatorname.iscsi, else derived from the host name).
	Host, Initiator string
}

// Cinder auth strategies.
const (
	CinderKeystone = "keystone"
	CinderNoAuth   = "noauth"
)

var cinderKeys = []string{"auth_strategy", "endpoint", "project_id", "auth_url", "username", "password", "user_domain_name",
	"project_name", "project_domain_name", "application_credential_id", "application_credential_secret", "region_name",
	"template_volume_type", "host", "initiator"}

// loadCinder reads [cinder]; a file without the section leaves c.Cinder nil.
func loadCinder(f *ini.File, c *Config, bad func(sec, key, why string) error) error {
	s, err := f.GetSection("cinder")
	if err != nil || len(s.Keys()) == 0 {
		return nil
	}
	cc := &Cinder{}
	for key, dst := range map[string]*string{"auth_strategy": &cc.AuthStrategy, "endpoint": &cc.Endpoint, "project_id": &cc.ProjectID,
		"auth_url": &cc.AuthURL, "username": &cc.Username, "password": &cc.Password, "user_domain_name": &cc.UserDomainName,
		"project_name": &cc.ProjectName, "project_domain_name": &cc.ProjectDomainName,
		"application_credential_id": &cc.ApplicationCredentialID, "application_credential_secret": &cc.ApplicationCredentialSecret,
		"region_name": &cc.RegionName, "template_volume_type": &cc.TemplateVolumeType, "host": &cc.Host, "initiator": &cc.Initiator} {
		if s.HasKey(key) {
			*dst = strings.TrimSpace(s.Key(key).String())
		}
	}
	if key, why := cc.Validate(); key != "" {
		return bad("cinder", key, why)
	}
	c.Cinder = cc
	return nil
}

// Validate checks the section and fills in defaults (auth_strategy, host,
// initiator, the noauth endpoint's project). It answers the key at fault
// and why; "" when all is well. No answer holds a password.
func (cc *Cinder) Validate() (key, why string) {
	if cc.AuthStrategy == "" {
		cc.AuthStrategy = CinderKeystone
	}
	checkURL := func(key, v string) (string, string) {
		u, err := url.Parse(v)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			return key, fmt.Sprintf("%q is not an http(s) URL without credentials or query", redactURL(v))
		}
		return "", ""
	}
	if cc.Endpoint != "" {
		if k, w := checkURL("endpoint", cc.Endpoint); k != "" {
			return k, w
		}
		cc.Endpoint = strings.TrimRight(cc.Endpoint, "/")
	}
	switch cc.AuthStrategy {
	case CinderNoAuth:
		if cc.Endpoint == "" {
			return "endpoint", "required with auth_strategy = noauth (e.g. http://HOST:8776/v3/PROJECT_ID)"
		}
		last := cc.Endpoint[strings.LastIndex(cc.Endpoint, "/")+1:]
		switch {
		case cc.ProjectID == "" && (last == "" || last == "v3" || strings.HasPrefix(last, ":")):
			return "project_id", "required with auth_strategy = noauth when endpoint does not end in the project id"
		case cc.ProjectID != "" && last != cc.ProjectID:
			cc.Endpoint += "/" + cc.ProjectID
		case cc.ProjectID == "":
			cc.ProjectID = last
		}
		if strings.ContainsAny(cc.ProjectID, "/: ") {
			return "project_id", fmt.Sprintf("%q is not a project id", cc.ProjectID)
		}
	case CinderKeystone:
		if cc.AuthURL == "" {
			return "auth_url", "required with auth_strategy = keystone"
		}
		if k, w := checkURL("auth_url", cc.AuthURL); k != "" {
			return k, w
		}
		appCred := cc.ApplicationCredentialID != "" || cc.ApplicationCredentialSecret != ""
		switch {
		case appCred && (cc.Username != "" || cc.Password != ""):
			return "application_credential_id", "give an application credential or username and password, not both"
		case appCred && cc.ApplicationCredentialID == "":
			return "application_credential_id", "required with application_credential_secret"
		case appCred && cc.ApplicationCredentialSecret == "":
			return "application_credential_secret", "required with application_credential_id"
		case !appCred && cc.Username == "":
			return "username", "required with auth_strategy = keystone (or application_credential_id and _secret)"
		case !appCred && cc.Password == "":
			return "password", "required with username"
		case !appCred && cc.ProjectName == "":
			return "project_name", "required with username (the project the token is scoped to)"
		}
		if !appCred {
			if cc.UserDomainName == "" {
				cc.UserDomainName = "Default"
			}
			if cc.ProjectDomainName == "" {
				cc.ProjectDomainName = "Default"
			}
		}
	default:
		return "auth_strategy", fmt.Sprintf("%q is not keystone or noauth", cc.AuthStrategy)
	}
	if cc.Host == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			return "host", "not set and the host name is unknown"
		}
		cc.Host = h
	}
	if cc.Initiator == "" {
		cc.Initiator = origin.DefaultInitiator()
	} else if !strings.HasPrefix(strings.ToLower(cc.Initiator), "iqn.") && !strings.HasPrefix(strings.ToLower(cc.Initiator), "eui.") &&
		!strings.HasPrefix(strings.ToLower(cc.Initiator), "naa.") {
		return "initiator", fmt.Sprintf("%q is not an iSCSI name (iqn., eui. or naa.)", cc.Initiator)
	}
	return "", ""
}

// redactURL drops a URL's user info (it could hold a password).
func redactURL(v string) string {
	if u, err := url.Parse(v); err == nil && u.User != nil {
		u.User = url.User("***")
		return u.String()
	}
	return v
}
