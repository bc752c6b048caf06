package peers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// quietLog drops net/http's own log lines (handshake errors of refused
// peers): what matters is counted and returned instead.
var quietLog = log.New(io.Discard, "", 0)

// Peer is a member as the client dials it: its name (which its TLS
// certificate must carry) and its chunk server's address.
type Peer struct {
	Name, Addr string
}

// ClientOptions bound the chunk client.
type ClientOptions struct {
	// Timeout bounds one chunk request, from dial to the last byte
	// (default 2 s): a slow peer is skipped for the next candidate.
	Timeout time.Duration
	// MaxChunk is the largest chunk the client reads (default 4 MiB).
	MaxChunk int64
}

// Client fetches chunks from peers over mutual TLS (HTTP/2: many requests
// in flight on one connection per peer, and a spare connection for
// hedged requests, so that one stalled TCP connection does not hold them
// all).
type Client struct {
	id   *Identity
	opts ClientOptions
	mu   sync.Mutex
	hcs  map[lane]*http.Client // one transport per member name, address and lane
}

// A lane is one of the two connections the client keeps to a peer.
type lane struct {
	Peer
	spare bool
}

// FetchError is a failed chunk request. Unavailable is true when the peer
// could not be reached or did not answer in time (as opposed to answering
// with an error or bad bytes).
type FetchError struct {
	Peer        string
	Status      int // HTTP status, 0 when there was no answer
	Unavailable bool
	Err         error
}

func (e *FetchError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("peer %s: status %d: %v", e.Peer, e.Status, e.Err)
	}
	return fmt.Sprintf("peer %s: %v", e.Peer, e.Err)
}

func (e *FetchError) Unwrap() error { return e.Err }

// NewClient makes a chunk client that authenticates as id.
func NewClient(id *Identity, opts ClientOptions) *Client {
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Second
	}
	if opts.MaxChunk <= 0 {
		opts.MaxChunk = 4 << 20
	}
	return &Client{id: id, opts: opts, hcs: map[lane]*http.Client{}}
}

// client is the HTTP client of peer: its transport dials peer.Addr and
// checks that the server's certificate names peer.Name. A member seen at
// a new address gets a new transport (the old one's connections close).
func (c *Client) client(peer Peer) *http.Client { return c.laneClient(lane{Peer: peer}) }

func (c *Client) laneClient(ln lane) *http.Client {
	peer := ln.Peer
	c.mu.Lock()
	defer c.mu.Unlock()
	if hc := c.hcs[ln]; hc != nil {
		return hc
	}
	for l, hc := range c.hcs {
		if l.Name == peer.Name && l.Addr != peer.Addr {
			hc.CloseIdleConnections()
			delete(c.hcs, l)
		}
	}
	dialer := &net.Dialer{Timeout: c.opts.Timeout, KeepAlive: 15 * time.Second}
	conf := c.id.ClientConfig()
	conf.ServerName = peer.Name
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, network, peer.Addr)
		},
		TLSClientConfig:        conf,
		TLSHandshakeTimeout:    handshakeTimeout,
		ForceAttemptHTTP2:      true,
		MaxResponseHeaderBytes: 4 << 10,
		IdleConnTimeout:        time.Minute,
		HTTP2:                  &http.HTTP2Config{SendPingTimeout: 15 * time.Second, PingTimeout: 5 * time.Second},
	}
	hc := &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return errors.New("peers do not redirect")
	}}
	c.hcs[ln] = hc
	return hc
}

// renew gives lane ln a new connection for its next request, after a
// request on it timed out: the old one may be stalled (TCP backing off),
// and every request on it with it. Its requests in flight finish or time
// out on it; then it closes.
func (c *Client) renew(ln lane, stale *http.Client) {
	c.mu.Lock()
	if c.hcs[ln] == stale {
		delete(c.hcs, ln)
	}
	c.mu.Unlock()
	time.AfterFunc(c.opts.Timeout, stale.CloseIdleConnections)
}

// Close drops the client's connections.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p, hc := range c.hcs {
		hc.CloseIdleConnections()
		delete(c.hcs, p)
	}
}

// FetchMode says how a chunk request is sent.
type FetchMode struct {
	// Spare sends it on the peer's spare connection (a hedge of a request
	// in flight on the first).
	Spare bool
	// CachedOnly asks the peer to answer only with a chunk it holds: one
	// it would have to read from its origin is answered 404 instead, so
	// a hedge never makes a second origin read of a chunk.
	CachedOnly bool
}

// Fetch reads chunk req.Index into p, whose length must be the chunk's
// (req.ChunkSize, or less for the last chunk): an answer of any other
// length is refused. The bytes are not verified here (see Source).
func (c *Client) Fetch(ctx context.Context, peer Peer, req Request, p []byte) error {
	return c.FetchWith(ctx, peer, req, p, FetchMode{})
}

// FetchWith is Fetch sent as mode says.
func (c *Client) FetchWith(ctx context.Context, peer Peer, req Request, p []byte, mode FetchMode) error {
	fail := func(status int, unavailable bool, err error) error {
		return &FetchError{Peer: peer.Name, Status: status, Unavailable: unavailable, Err: err}
	}
	if err := validName(peer.Name); err != nil {
		return fail(0, false, err)
	}
	if int64(len(p)) > min(req.ChunkSize, c.opts.MaxChunk) || len(p) == 0 {
		return fail(0, false, fmt.Errorf("chunk of %d bytes asked (chunk size %d, limit %d)", len(p), req.ChunkSize, c.opts.MaxChunk))
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	query := req.query()
	if mode.CachedOnly {
		query += "&" + cachedOnlyParam + "=1"
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+peer.Name+chunkPath+"?"+query, nil)
	if err != nil {
		return fail(0, false, err)
	}
	ln := lane{Peer: peer, spare: mode.Spare}
	hc := c.laneClient(ln)
	timedOut := func(err error) error {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			c.renew(ln, hc)
		}
		return err
	}
	resp, err := hc.Do(hr)
	if err != nil {
		return fail(0, true, timedOut(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fail(resp.StatusCode, resp.StatusCode == http.StatusServiceUnavailable, errors.New(strings.TrimSpace(string(msg))))
	}
	if resp.ContentLength != int64(len(p)) {
		return fail(resp.StatusCode, false, fmt.Errorf("answer of %s bytes for a chunk of %d", strconv.FormatInt(resp.ContentLength, 10), len(p)))
	}
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return fail(resp.StatusCode, true, fmt.Errorf("read chunk: %w", timedOut(err)))
	}
	// Read to the end of the stream: closing it before would reset it,
	// and the server could count its answer as not delivered.
	var one [1]byte
	if _, err := resp.Body.Read(one[:]); err != io.EOF {
		return fail(resp.StatusCode, true, fmt.Errorf("read chunk: no end of stream after %d bytes (%v)", len(p), err))
	}
	return nil
}

// FetchTrace asks peer for the boot trace file of base key (at most
// MaxTraceBytes; not decoded here). A peer without one answers 404: a
// FetchError with Status 404.
func (c *Client) FetchTrace(ctx context.Context, peer Peer, key BaseKey) ([]byte, error) {
	return c.fetchFile(ctx, peer, key, tracePath, "trace", MaxTraceBytes)
}

// FetchManifest asks peer for the manifest file of base key (at most
// MaxManifestBytes). It is neither parsed nor trusted here: the caller
// checks its root against one that did not come from a peer.
func (c *Client) FetchManifest(ctx context.Context, peer Peer, key BaseKey) ([]byte, error) {
	return c.fetchFile(ctx, peer, key, manifestPath, "manifest", MaxManifestBytes)
}

func (c *Client) fetchFile(ctx context.Context, peer Peer, key BaseKey, path, what string, limit int64) ([]byte, error) {
	fail := func(status int, unavailable bool, err error) error {
		return &FetchError{Peer: peer.Name, Status: status, Unavailable: unavailable, Err: err}
	}
	if err := validName(peer.Name); err != nil {
		return nil, fail(0, false, err)
	}
	if err := key.validate(); err != nil {
		return nil, fail(0, false, err)
	}
	ctx, cancel := context.WithTimeout(ctx, max(c.opts.Timeout, fileTimeout))
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+peer.Name+path+"?"+key.query(), nil)
	if err != nil {
		return nil, fail(0, false, err)
	}
	resp, err := c.client(peer).Do(hr)
	if err != nil {
		return nil, fail(0, true, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fail(resp.StatusCode, resp.StatusCode == http.StatusServiceUnavailable, errors.New(strings.TrimSpace(string(msg))))
	}
	if resp.ContentLength > limit {
		return nil, fail(resp.StatusCode, false, fmt.Errorf("%s of %d bytes: the limit is %d", what, resp.ContentLength, limit))
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, fail(resp.StatusCode, true, fmt.Errorf("read %s: %w", what, err))
	}
	if int64(len(raw)) > limit {
		return nil, fail(resp.StatusCode, false, fmt.Errorf("%s larger than %d bytes", what, limit))
	}
	return raw, nil
}

// fileTimeout bounds a trace or manifest request at least (a manifest of
// a large base is megabytes, more than a chunk's timeout allows).
const fileTimeout = 30 * time.Second
