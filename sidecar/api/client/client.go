// Package client calls the sidecar's API over its unix socket. The CLI and
// the end-to-end tests use it; errors from the daemon come back as
// *api.Error with the daemon's message and code.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// Client talks to one daemon.
type Client struct {
	Socket string
	hc     *http.Client
}

// New returns a client for the API socket at path.
func New(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    2,
		IdleConnTimeout: 30 * time.Second,
	}
	// Creating an export may log in to an iSCSI target with retries; the
	// caller's context bounds it, this only stops a hung daemon.
	return &Client{Socket: socket, hc: &http.Client{Transport: tr, Timeout: 5 * time.Minute}}
}

// Do sends a request with an optional JSON body and decodes a JSON answer
// into out (when non-nil). Non-2xx answers become *api.Error.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	ctype := ""
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd, ctype = bytes.NewReader(b), "application/json"
	}
	data, err := c.send(ctx, method, path, rd, ctype)
	if err != nil {
		return err
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("daemon at %s: bad answer to %s %s: %w", c.Socket, method, path, err)
		}
	}
	return nil
}

// send sends a request and returns the answer's body; non-2xx answers
// become *api.Error.
func (c *Client) send(ctx context.Context, method, path string, body io.Reader, ctype string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://vmthunder"+path, body)
	if err != nil {
		return nil, err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("daemon at %s: %w", c.Socket, unwrapURLError(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("daemon at %s: reading answer: %w", c.Socket, err)
	}
	if resp.StatusCode >= 300 {
		e := &api.Error{Status: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Message == "" {
			e.Message = fmt.Sprintf("HTTP %s: %s", resp.Status, bytes.TrimSpace(data))
		}
		return nil, e
	}
	return data, nil
}

// Trace describes base id's boot trace.
func (c *Client) Trace(ctx context.Context, id string) (*api.Trace, error) {
	var t api.Trace
	return &t, c.Do(ctx, "GET", p("/bases/%s/trace", id), nil, &t)
}

// StopTrace ends base id's recording now.
func (c *Client) StopTrace(ctx context.Context, id string) (*api.Trace, error) {
	var t api.Trace
	return &t, c.Do(ctx, "POST", p("/bases/%s/trace/stop", id), nil, &t)
}

// DeleteTrace removes base id's boot trace.
func (c *Client) DeleteTrace(ctx context.Context, id string) error {
	return c.Do(ctx, "DELETE", p("/bases/%s/trace", id), nil, nil)
}

// ExportTrace is base id's trace file.
func (c *Client) ExportTrace(ctx context.Context, id string) ([]byte, error) {
	return c.send(ctx, "GET", p("/bases/%s/trace/data", id), nil, "")
}

// ImportTrace stores raw (a trace file) as base id's boot trace.
func (c *Client) ImportTrace(ctx context.Context, id string, raw []byte) (*api.Trace, error) {
	data, err := c.send(ctx, "PUT", p("/bases/%s/trace/data", id), bytes.NewReader(raw), "application/octet-stream")
	if err != nil {
		return nil, err
	}
	var t api.Trace
	if err := json.Unmarshal(data, &t); err != nil {
		return nil, fmt.Errorf("daemon at %s: bad answer to a trace import: %w", c.Socket, err)
	}
	return &t, nil
}

func unwrapURLError(err error) error {
	if ue, ok := err.(*url.Error); ok {
		return ue.Err
	}
	return err
}

func p(format string, a ...any) string {
	args := make([]any, len(a))
	for i, v := range a {
		args[i] = url.PathEscape(fmt.Sprint(v))
	}
	return "/" + api.Version + fmt.Sprintf(format, args...)
}

// Create makes an export.
func (c *Client) Create(ctx context.Context, req api.CreateRequest) (*api.Export, error) {
	var e api.Export
	return &e, c.Do(ctx, http.MethodPost, p("/exports"), req, &e)
}

// Get returns one export.
func (c *Client) Get(ctx context.Context, id string) (*api.Export, error) {
	var e api.Export
	return &e, c.Do(ctx, http.MethodGet, p("/exports/%s", id), nil, &e)
}

// List returns every export.
func (c *Client) List(ctx context.Context) ([]api.Export, error) {
	var l api.ExportList
	err := c.Do(ctx, http.MethodGet, p("/exports"), nil, &l)
	return l.Exports, err
}

// Delete removes an export; deleteCOW also removes its copy-on-write store.
func (c *Client) Delete(ctx context.Context, id string, deleteCOW bool) error {
	path := p("/exports/%s", id)
	if deleteCOW {
		path += "?delete_cow=true"
	}
	return c.Do(ctx, http.MethodDelete, path, nil, nil)
}

// Refresh re-reads the origin's size.
func (c *Client) Refresh(ctx context.Context, id string) (*api.Export, error) {
	var e api.Export
	return &e, c.Do(ctx, http.MethodPost, p("/exports/%s/refresh", id), nil, &e)
}

// Bases lists the base caches.
func (c *Client) Bases(ctx context.Context) ([]api.Base, error) {
	var l api.BaseList
	err := c.Do(ctx, http.MethodGet, p("/bases"), nil, &l)
	return l.Bases, err
}

// Base describes one base, with its warm-up.
func (c *Client) Base(ctx context.Context, id string) (*api.Base, error) {
	var b api.Base
	return &b, c.Do(ctx, http.MethodGet, p("/bases/%s", id), nil, &b)
}

// Warm starts a warm-up of base id (req may be nil when an export of the
// base is open).
func (c *Client) Warm(ctx context.Context, id string, req *api.WarmRequest) (*api.WarmStatus, error) {
	var w api.WarmStatus
	var body any
	if req != nil {
		body = req
	}
	return &w, c.Do(ctx, http.MethodPost, p("/bases/%s/warm", id), body, &w)
}

// DeleteBase removes an unused base cache.
func (c *Client) DeleteBase(ctx context.Context, id string) error {
	return c.Do(ctx, http.MethodDelete, p("/bases/%s", id), nil, nil)
}

// Health asks whether the daemon is up.
func (c *Client) Health(ctx context.Context) (*api.Health, error) {
	var h api.Health
	return &h, c.Do(ctx, http.MethodGet, p("/health"), nil, &h)
}

// Info returns the node's identity (host, initiator IQN).
func (c *Client) Info(ctx context.Context) (*api.Info, error) {
	var i api.Info
	return &i, c.Do(ctx, http.MethodGet, p("/info"), nil, &i)
}

// Stats returns node counters.
func (c *Client) Stats(ctx context.Context) (*api.Stats, error) {
	var s api.Stats
	return &s, c.Do(ctx, http.MethodGet, p("/stats"), nil, &s)
}

// WaitHealthy polls Health until it answers or ctx ends.
func (c *Client) WaitHealthy(ctx context.Context) error {
	for {
		_, err := c.Health(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("daemon at %s not healthy: %w", c.Socket, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Peers is the daemon's view of the peers cluster (GET /v1/peers).
func (c *Client) Peers(ctx context.Context) (*api.Peers, error) {
	var v api.Peers
	if err := c.Do(ctx, http.MethodGet, p("/peers"), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// ImportManifest stores raw as template base id's chunk manifest; root,
// when set, pins its root digest.
func (c *Client) ImportManifest(ctx context.Context, id string, raw []byte, root string) (*api.Manifest, error) {
	path := p("/bases/%s/manifest", id)
	if root != "" {
		path += "?root=" + url.QueryEscape(root)
	}
	data, err := c.send(ctx, http.MethodPost, path, bytes.NewReader(raw), "application/octet-stream")
	if err != nil {
		return nil, err
	}
	var m api.Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("daemon at %s: bad answer to a manifest import: %w", c.Socket, err)
	}
	return &m, nil
}

// Templates lists the template volumes published in Cinder, newest first;
// imageID, when set, keeps those of that image.
func (c *Client) Templates(ctx context.Context, imageID string) ([]api.Template, error) {
	path := p("/templates")
	if imageID != "" {
		path += "?image_id=" + url.QueryEscape(imageID)
	}
	var l api.TemplateList
	err := c.Do(ctx, http.MethodGet, path, nil, &l)
	return l.Templates, err
}
