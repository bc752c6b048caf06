// Package openstack is the sidecar's Cinder client (gophercloud): template
// volumes (list, get, create, metadata, read-only flag) and attachments
// (API microversion 3.54) with this node's connector. It keeps every
// answer bounded, turns Cinder's errors into *Error with Cinder's own
// message, and never logs or returns a password.
package openstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"time"

	"github.com/gophercloud/gophercloud/v2"
	gcos "github.com/gophercloud/gophercloud/v2/openstack"

	"github.com/vmthunder/vmthunder/sidecar/config"
)

// Microversion is the block-storage API version every call asks for:
// 3.54 is the first with an attachment's mode (ro for templates).
const Microversion = "3.54"

// MaxAnswer bounds one answer from Cinder or Keystone.
const MaxAnswer = 16 << 20

// Client talks to one Cinder as configured by [cinder].
type Client struct {
	bs  *gophercloud.ServiceClient
	cfg config.Cinder
}

// New authenticates (keystone) or prepares a noauth client. The context
// bounds the authentication only.
func New(ctx context.Context, cc *config.Cinder) (*Client, error) {
	if cc == nil {
		return nil, errors.New("no [cinder] section in the config")
	}
	hc := &http.Client{Timeout: 2 * time.Minute, Transport: boundedTransport{base: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: 90 * time.Second,
		MaxIdleConnsPerHost:   4,
		IdleConnTimeout:       60 * time.Second,
	}}}
	var sc *gophercloud.ServiceClient
	switch cc.AuthStrategy {
	case config.CinderNoAuth:
		pc := &gophercloud.ProviderClient{HTTPClient: *hc, TokenID: "vmthunder:" + cc.ProjectID}
		pc.UserAgent.Prepend("vmthunder")
		sc = &gophercloud.ServiceClient{ProviderClient: pc, Endpoint: gophercloud.NormalizeURL(cc.Endpoint), Type: "block-storage"}
	default:
		opts := gophercloud.AuthOptions{
			IdentityEndpoint:            cc.AuthURL,
			Username:                    cc.Username,
			Password:                    cc.Password,
			DomainName:                  cc.UserDomainName,
			ApplicationCredentialID:     cc.ApplicationCredentialID,
			ApplicationCredentialSecret: cc.ApplicationCredentialSecret,
			AllowReauth:                 true,
		}
		if cc.ApplicationCredentialID == "" {
			opts.Scope = &gophercloud.AuthScope{ProjectName: cc.ProjectName, DomainName: cc.ProjectDomainName}
		}
		pc, err := gcos.NewClient(cc.AuthURL)
		if err != nil {
			return nil, fmt.Errorf("cinder: auth_url %s: %w", cc.AuthURL, err)
		}
		pc.HTTPClient = *hc
		pc.UserAgent.Prepend("vmthunder")
		if err := gcos.Authenticate(ctx, pc, opts); err != nil {
			return nil, wrap("authenticating with keystone at "+cc.AuthURL, err)
		}
		bs, err := gcos.NewBlockStorageV3(pc, gophercloud.EndpointOpts{Region: cc.RegionName})
		if err != nil {
			return nil, fmt.Errorf("cinder: no block-storage v3 endpoint in the catalog (region %q): %w", cc.RegionName, err)
		}
		if cc.Endpoint != "" {
			bs.Endpoint = gophercloud.NormalizeURL(cc.Endpoint)
		}
		sc = bs
	}
	sc.Microversion = Microversion
	return &Client{bs: sc, cfg: *cc}, nil
}

// Endpoint is the block-storage endpoint in use.
func (c *Client) Endpoint() string { return c.bs.Endpoint }

// Host is this node's name in attachments ([cinder] host).
func (c *Client) Host() string { return c.cfg.Host }

// Error is Cinder (or Keystone) refusing or failing a call.
type Error struct {
	Op      string // what was asked, for the message
	Status  int    // HTTP status; 0 when no answer came
	Message string // Cinder's own message, or the transport error
}

func (e *Error) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("cinder: %s: %s", e.Op, e.Message)
	}
	return fmt.Sprintf("cinder: %s: HTTP %d: %s", e.Op, e.Status, e.Message)
}

// IsNotFound says whether err is Cinder answering 404.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

// wrap turns a gophercloud error into *Error, with the message Cinder put
// in its answer ({"itemNotFound": {"message": ...}}) rather than the body.
func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	var ue gophercloud.ErrUnexpectedResponseCode
	if errors.As(err, &ue) {
		return &Error{Op: op, Status: ue.Actual, Message: answerMessage(ue.Body)}
	}
	var ae *gophercloud.ErrUnexpectedResponseCode
	if errors.As(err, &ae) {
		return &Error{Op: op, Status: ae.Actual, Message: answerMessage(ae.Body)}
	}
	return &Error{Op: op, Message: err.Error()}
}

// answerMessage is the message of an OpenStack error body, else the body
// itself, short and on one line.
func answerMessage(body []byte) string {
	msg := findMessage(body)
	if msg == "" {
		msg = strings.TrimSpace(string(body))
	}
	msg = strings.Join(strings.Fields(msg), " ")
	if len(msg) > 512 {
		msg = msg[:512] + "..."
	}
	if msg == "" {
		msg = "(no message)"
	}
	return msg
}

// boundedTransport cuts every answer at MaxAnswer bytes (an error, not a
// silently short body).
type boundedTransport struct{ base http.RoundTripper }

func (t boundedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	if err != nil || resp.Body == nil {
		return resp, err
	}
	resp.Body = &boundedBody{rc: resp.Body, left: MaxAnswer}
	return resp, nil
}

type boundedBody struct {
	rc   io.ReadCloser
	left int64
}

var errTooLarge = fmt.Errorf("answer larger than %d bytes", MaxAnswer)

func (b *boundedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// One byte more tells a body of exactly MaxAnswer from a longer one.
		var one [1]byte
		if n, _ := b.rc.Read(one[:]); n > 0 {
			return 0, errTooLarge
		}
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	return n, err
}

func (b *boundedBody) Close() error { return b.rc.Close() }

// Connector is this node as an attachment's connector says it (what
// os-brick's get_connector_properties would report for it).
func (c *Client) Connector(mode string) map[string]any {
	return map[string]any{
		"host":            c.cfg.Host,
		"initiator":       c.cfg.Initiator,
		"ip":              localIP(),
		"platform":        platform(),
		"os_type":         runtime.GOOS,
		"multipath":       false,
		"do_local_attach": false,
		"mode":            mode,
	}
}

// platform is the machine as os-brick names it (uname -m).
func platform() string {
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64"
	case "arm64":
		return "aarch64"
	}
	return runtime.GOARCH
}

// localIP is the address this node reaches the network from (the
// connector's "ip"; informational for iSCSI).
func localIP() string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "127.0.0.1"
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String()
		}
	}
	return "127.0.0.1"
}
