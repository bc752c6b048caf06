package peers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// BaseKey names one template generation on every node: the base id (its
// cache directory name, stack.TemplateBaseID) and the template and
// generation it is derived from. A node answers for a base only when all
// three match what it has open, so a chunk of one generation is never
// served for another.
type BaseKey struct {
	ID, Template, Generation string
}

func (k BaseKey) validate() error {
	if err := cache.ValidID(k.ID); err != nil {
		return err
	}
	if err := cache.ValidID(k.Template); err != nil {
		return fmt.Errorf("template: %w", err)
	}
	if k.Generation == "" || len(k.Generation) > 256 {
		return fmt.Errorf("generation of %d bytes (want 1-256)", len(k.Generation))
	}
	for _, c := range []byte(k.Generation) {
		if c < 0x21 || c > 0x7e {
			return errors.New("generation holds a byte outside printable ASCII")
		}
	}
	return nil
}

// Request asks for one chunk: bytes [Index*ChunkSize, +ChunkSize) of the
// base (the last chunk is short).
type Request struct {
	Base      BaseKey
	ChunkSize int64
	Index     int64
}

const (
	chunkPath    = "/v1/chunk"
	tracePath    = "/v1/trace"
	manifestPath = "/v1/manifest"
)

// MaxTraceBytes bounds a boot trace file asked from a peer (as
// prefetch.MaxFileBytes bounds one on disk).
const MaxTraceBytes = 16 << 20

func (k BaseKey) query() string {
	return url.Values{"base": {k.ID}, "template": {k.Template}, "generation": {k.Generation}}.Encode()
}

func parseQuery(raw string) (url.Values, error) {
	if len(raw) > 2048 {
		return nil, errors.New("query too long")
	}
	q, err := url.ParseQuery(raw)
	if err != nil {
		return nil, err
	}
	for k, v := range q {
		if len(v) != 1 {
			return nil, fmt.Errorf("parameter %q given %d times", k, len(v))
		}
	}
	return q, nil
}

func parseKey(q url.Values) (BaseKey, error) {
	k := BaseKey{ID: q.Get("base"), Template: q.Get("template"), Generation: q.Get("generation")}
	return k, k.validate()
}

func (r Request) query() string {
	return url.Values{
		"base": {r.Base.ID}, "template": {r.Base.Template}, "generation": {r.Base.Generation},
		"chunk_size": {strconv.FormatInt(r.ChunkSize, 10)}, "index": {strconv.FormatInt(r.Index, 10)},
	}.Encode()
}

// cachedOnlyParam, set to 1, asks for a chunk only if the server holds it
// (FetchMode.CachedOnly).
const cachedOnlyParam = "cached"

// parseChunkRequest parses a chunk request and whether it is cached-only.
func parseChunkRequest(raw string) (Request, bool, error) {
	q, err := parseQuery(raw)
	if err != nil {
		return Request{}, false, err
	}
	cachedOnly := false
	switch v := q.Get(cachedOnlyParam); v {
	case "", "0":
	case "1":
		cachedOnly = true
	default:
		return Request{}, false, fmt.Errorf("%s %q: want 0 or 1", cachedOnlyParam, v)
	}
	r, err := parseChunk(q)
	return r, cachedOnly, err
}

func parseChunk(q url.Values) (Request, error) {
	var r Request
	var err error
	if r.Base, err = parseKey(q); err != nil {
		return Request{}, err
	}
	if r.ChunkSize, err = strconv.ParseInt(q.Get("chunk_size"), 10, 64); err != nil || !validChunkSize(r.ChunkSize) {
		return Request{}, fmt.Errorf("chunk_size %q: want a power of two between 4 KiB and 64 MiB", q.Get("chunk_size"))
	}
	if r.Index, err = strconv.ParseInt(q.Get("index"), 10, 64); err != nil || r.Index < 0 {
		return Request{}, fmt.Errorf("index %q: want a chunk index", q.Get("index"))
	}
	return r, nil
}

// A ChunkReader reads a base's bytes from this node's own store, filling
// it from this node's own origin when absent — once for every concurrent
// asker — and never from a peer (see Source.ServeFrom).
type ChunkReader interface {
	ReadChunk(p []byte, off int64) error
}

// A CachedChunkReader can also answer only from what this node holds
// (a cached-only request, a hedge): a chunk it does not hold is
// ErrNotCached, never read from the origin.
type CachedChunkReader interface {
	ReadCachedChunk(p []byte, off int64) error
}

// ErrNotCached is a cached-only read of a chunk this node does not hold.
var ErrNotCached = errors.New("chunk not held here")

// ServerOptions bound what the chunk server spends on peers.
type ServerOptions struct {
	// MaxChunk is the largest chunk a peer may ask for (default 4 MiB).
	MaxChunk int64
	// MaxInFlight is how many chunks are read at once for peers (default
	// 64); more requests wait, up to their own deadline.
	MaxInFlight int
	// ServeLimit, when set, caps the bytes served to peers per second
	// ([peers] serve_rate), chunks and traces together.
	ServeLimit *rate.Limiter
	// Trace, when set, is the boot trace file of an open base (GET
	// /v1/trace); an error wrapping os.ErrNotExist when it has none.
	Trace func(key BaseKey) ([]byte, error)
	// Manifest, when set, is the manifest file of an open base (GET
	// /v1/manifest), which an asker verifies against a root it trusts; an
	// error wrapping os.ErrNotExist when the base has none.
	Manifest func(key BaseKey) ([]byte, error)
	// Traffic, when set, counts the chunk bytes served to each member.
	Traffic *Traffic
}

// ServerStats are the chunk server's counters.
type ServerStats struct {
	Requests    uint64 // chunk requests answered with a chunk
	BytesServed uint64
	Refused     uint64 // malformed, unknown base, out of range, outranked
	Failed      uint64 // the local read failed
}

// Server answers peers' chunk requests for the template bases registered
// with it. Every request comes over mutual TLS from a member of the
// cluster CA (Serve), and is bounded (query size, chunk size, reads in
// flight).
type Server struct {
	self string
	opts ServerOptions
	sem  chan struct{}

	mu    sync.RWMutex
	bases map[string]*servedBase

	requests, served, refused, failed atomic.Uint64
	corrupt, corruptManifests         atomic.Bool
	bufs                              sync.Map // int64 -> *sync.Pool of []byte

	srvMu sync.Mutex
	srv   *http.Server
}

type servedBase struct {
	key  BaseKey
	size int64
	r    ChunkReader
	refs int
}

// NewServer makes the chunk server of member self.
func NewServer(self string, opts ServerOptions) *Server {
	if opts.MaxChunk <= 0 {
		opts.MaxChunk = 4 << 20
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 64
	}
	return &Server{self: self, opts: opts, sem: make(chan struct{}, opts.MaxInFlight), bases: map[string]*servedBase{}}
}

// Register serves the base key of size bytes from r until the returned
// function is called. Registering an open base again takes another
// reference on it; registering its id with another template or generation
// is refused.
func (s *Server) Register(key BaseKey, size int64, r ChunkReader) (unregister func(), err error) {
	if err := key.validate(); err != nil {
		return nil, fmt.Errorf("peers: register base: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.bases[key.ID]
	if b != nil && (b.key != key || b.size != size) {
		return nil, fmt.Errorf("%w: base %s is served as template %s generation %s", cache.ErrConflict, key.ID, b.key.Template, b.key.Generation)
	}
	if b == nil {
		b = &servedBase{key: key, size: size, r: r}
		s.bases[key.ID] = b
	}
	b.refs++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if b.refs--; b.refs == 0 && s.bases[key.ID] == b {
				delete(s.bases, key.ID)
			}
			s.mu.Unlock()
		})
	}, nil
}

// Bases lists the keys of the bases served, for the membership metadata.
func (s *Server) Bases() []BaseKey {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]BaseKey, 0, len(s.bases))
	for _, b := range s.bases {
		out = append(out, b.key)
	}
	return out
}

// SetCorrupt is a test-only fault switch: every chunk served afterwards
// has one byte flipped.
func (s *Server) SetCorrupt(on bool) { s.corrupt.Store(on) }

// SetCorruptManifests is a test-only fault switch: every manifest served
// afterwards has one byte flipped.
func (s *Server) SetCorruptManifests(on bool) { s.corruptManifests.Store(on) }

// Stats returns the counters.
func (s *Server) Stats() ServerStats {
	return ServerStats{Requests: s.requests.Load(), BytesServed: s.served.Load(), Refused: s.refused.Load(), Failed: s.failed.Load()}
}

func (s *Server) refuse(w http.ResponseWriter, code int, format string, args ...any) {
	s.refused.Add(1)
	http.Error(w, fmt.Sprintf(format, args...), code)
}

// ServeHTTP answers GET /v1/chunk?base=&template=&generation=&chunk_size=&index=
// with the chunk's bytes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case tracePath:
		s.serveFile(w, r, "trace", s.opts.Trace, MaxTraceBytes, nil)
		return
	case manifestPath:
		s.serveFile(w, r, "manifest", s.opts.Manifest, MaxManifestBytes, &s.corruptManifests)
		return
	}
	if r.URL.Path != chunkPath {
		s.refuse(w, http.StatusNotFound, "not found")
		return
	}
	if r.Method != http.MethodGet {
		s.refuse(w, http.StatusMethodNotAllowed, "GET only")
		return
	}
	asker := peerName(r.TLS)
	if asker == "" {
		s.refuse(w, http.StatusUnauthorized, "no client certificate")
		return
	}
	req, cachedOnly, err := parseChunkRequest(r.URL.RawQuery)
	if err != nil {
		s.refuse(w, http.StatusBadRequest, "bad chunk request: %v", err)
		return
	}
	if req.ChunkSize > s.opts.MaxChunk {
		s.refuse(w, http.StatusBadRequest, "chunk_size %d is above this node's limit %d", req.ChunkSize, s.opts.MaxChunk)
		return
	}
	s.mu.RLock()
	b := s.bases[req.Base.ID]
	s.mu.RUnlock()
	if b == nil || b.key != req.Base {
		s.refuse(w, http.StatusNotFound, "base %s (template %s generation %s) is not open here", req.Base.ID, req.Base.Template, req.Base.Generation)
		return
	}
	if req.Index > (b.size-1)/req.ChunkSize {
		s.refuse(w, http.StatusRequestedRangeNotSatisfiable, "chunk %d is past the end of base %s (%d bytes)", req.Index, req.Base.ID, b.size)
		return
	}
	// A node only asks members that outweigh it for the chunk, so every
	// chain of requests (an asker's fill waiting on a home whose own fill
	// waits on another) climbs in weight and cannot wait on itself.
	if asker != s.self && Weight(asker, req.Base.ID, req.Index) > Weight(s.self, req.Base.ID, req.Index) {
		s.refuse(w, http.StatusMisdirectedRequest, "%s outweighs %s for chunk %d of %s: it is the better home", asker, s.self, req.Index, req.Base.ID)
		return
	}
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	case <-r.Context().Done():
		return
	}
	off := req.Index * req.ChunkSize
	n := min(req.ChunkSize, b.size-off)
	bp := s.buf(req.ChunkSize)
	defer s.putBuf(req.ChunkSize, bp)
	p := (*bp)[:n]
	read := b.r.ReadChunk
	if cachedOnly {
		read = readCached(b.r)
	}
	if err := read(p, off); errors.Is(err, ErrNotCached) {
		// Not a failure: the asker hedged and waits for the home too.
		http.Error(w, fmt.Sprintf("chunk %d of %s is not held here", req.Index, req.Base.ID), http.StatusNotFound)
		return
	} else if err != nil {
		s.failed.Add(1)
		http.Error(w, fmt.Sprintf("read chunk %d of %s: %v", req.Index, req.Base.ID, err), http.StatusServiceUnavailable)
		return
	}
	if s.corrupt.Load() {
		p[len(p)/2] ^= 0x5a
	}
	if err := WaitBytes(r.Context(), s.opts.ServeLimit, len(p)); err != nil {
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	w.WriteHeader(http.StatusOK)
	if _, err := w.Write(p); err == nil {
		s.requests.Add(1)
		s.served.Add(uint64(n))
		s.opts.Traffic.served(asker, len(p))
	}
}

// readCached is r's cached-only read; a reader that cannot tell what it
// holds holds nothing for a cached-only request.
func readCached(r ChunkReader) func(p []byte, off int64) error {
	if cr, ok := r.(CachedChunkReader); ok {
		return cr.ReadCachedChunk
	}
	return func([]byte, int64) error { return ErrNotCached }
}

// serveFile answers GET /v1/trace or /v1/manifest ?base=&template=&generation=
// with that file of a base open here (read by file, at most limit bytes),
// under the same checks as a chunk: a client certificate of the cluster,
// the base open here as exactly that template generation. corrupt, when
// set and on, flips a byte of the answer (a test fault).
func (s *Server) serveFile(w http.ResponseWriter, r *http.Request, what string, file func(BaseKey) ([]byte, error), limit int, corrupt *atomic.Bool) {
	if r.Method != http.MethodGet {
		s.refuse(w, http.StatusMethodNotAllowed, "GET only")
		return
	}
	if peerName(r.TLS) == "" {
		s.refuse(w, http.StatusUnauthorized, "no client certificate")
		return
	}
	q, err := parseQuery(r.URL.RawQuery)
	if err != nil {
		s.refuse(w, http.StatusBadRequest, "bad %s request: %v", what, err)
		return
	}
	key, err := parseKey(q)
	if err != nil {
		s.refuse(w, http.StatusBadRequest, "bad %s request: %v", what, err)
		return
	}
	s.mu.RLock()
	b := s.bases[key.ID]
	s.mu.RUnlock()
	if b == nil || b.key != key || file == nil {
		s.refuse(w, http.StatusNotFound, "base %s (template %s generation %s) is not open here", key.ID, key.Template, key.Generation)
		return
	}
	raw, err := file(key)
	switch {
	case errors.Is(err, os.ErrNotExist):
		s.refuse(w, http.StatusNotFound, "base %s has no %s here", key.ID, what)
		return
	case err != nil:
		s.failed.Add(1)
		http.Error(w, fmt.Sprintf("%s of %s: %v", what, key.ID, err), http.StatusServiceUnavailable)
		return
	case len(raw) > limit:
		s.failed.Add(1)
		http.Error(w, what+" too large", http.StatusServiceUnavailable)
		return
	}
	if corrupt != nil && corrupt.Load() && len(raw) > 0 {
		raw = append([]byte(nil), raw...)
		raw[len(raw)-1] ^= 0x5a
	}
	if err := WaitBytes(r.Context(), s.opts.ServeLimit, len(raw)); err != nil {
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(raw)))
	w.WriteHeader(http.StatusOK)
	w.Write(raw)
}

func (s *Server) buf(size int64) *[]byte {
	pl, _ := s.bufs.LoadOrStore(size, &sync.Pool{New: func() any { b := make([]byte, size); return &b }})
	return pl.(*sync.Pool).Get().(*[]byte)
}

func (s *Server) putBuf(size int64, b *[]byte) {
	if pl, ok := s.bufs.Load(size); ok {
		pl.(*sync.Pool).Put(b)
	}
}

// Serve answers peers on l over mutual TLS with id until Close. It
// returns nil after Close.
func (s *Server) Serve(l net.Listener, id *Identity) error {
	srv := &http.Server{
		Handler:           s,
		TLSConfig:         id.ServerConfig(),
		ReadHeaderTimeout: handshakeTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    8 << 10,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: 256, SendPingTimeout: 15 * time.Second, PingTimeout: 5 * time.Second},
		ErrorLog:          quietLog,
	}
	s.srvMu.Lock()
	if s.srv != nil {
		s.srvMu.Unlock()
		return errors.New("peers: chunk server already serving")
	}
	s.srv = srv
	s.srvMu.Unlock()
	err := srv.ServeTLS(l, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Close stops serving at once: requests in flight are cut (their askers
// fall back to another candidate or their origin).
func (s *Server) Close() error {
	s.srvMu.Lock()
	srv := s.srv
	s.srvMu.Unlock()
	if srv == nil {
		return nil
	}
	return srv.Close()
}

// Shutdown stops serving once the requests in flight are answered, or ctx
// is done (then as Close).
func (s *Server) Shutdown(ctx context.Context) error {
	s.srvMu.Lock()
	srv := s.srv
	s.srvMu.Unlock()
	if srv == nil {
		return nil
	}
	if err := srv.Shutdown(ctx); err != nil {
		return srv.Close()
	}
	return nil
}
