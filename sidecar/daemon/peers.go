package daemon

// Peers ([peers] in the config, off by default): a template base's cache
// fills from the other compute nodes that have it open (package peers:
// rendezvous homes, mutual TLS, every chunk verified against the base's
// manifest), then from the origin. A template base is used with peers
// only when it has a manifest: a template volume's comes by itself
// (manifests.go: from a peer or its manifest volume, checked against the
// root in Cinder); any other template's is imported by the operator
// (POST /v1/bases/{id}/manifest, `vmthunder manifest make|import`). A
// manifest's trust must not come from a peer, and computing one here
// would read the whole origin. Volume bases never use peers (stack).

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/sirupsen/logrus"
	"golang.org/x/time/rate"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/peers"
	"github.com/vmthunder/vmthunder/sidecar/prefetch"
)

// ManifestFile is a template base's manifest, beside its cache.
const ManifestFile = "manifest"

// maxManifestBytes bounds an imported manifest (1<<22 chunks of sha256,
// as peers.ParseManifest does).
const maxManifestBytes = 24 + (1<<22)*32

// peerNode is this daemon's place among the peers.
type peerNode struct {
	d    *Daemon
	id   *peers.Identity
	ml   *peers.Membership
	srv  *peers.Server
	cl   *peers.Client
	ln   net.Listener
	done chan struct{}
	// originLimit caps template bases' origin reads ([peers] origin_rate).
	originLimit *rate.Limiter
	// traffic counts chunk bytes per member and times fetches.
	traffic *peers.Traffic

	mu     sync.Mutex
	bases  map[string]*peerBase     // open template bases filling from peers
	stats  map[string]*peerStats    // per base, for as long as the daemon runs
	reason map[string]string        // open template bases filling from the origin only: why
	keys   map[string]peers.BaseKey // every template base opened, for asking peers its trace
	late   map[string]*lateSource   // open template volume bases whose manifest is being fetched
}

type peerBase struct {
	key        peers.BaseKey
	src        *peers.Source
	root       string
	manifest   []byte // the manifest file, served to peers that ask for it
	unregister func() // nil until served
}

type peerStats struct {
	src    peers.SourceStats
	served atomic.Uint64
	// corruptManifests counts manifests from peers refused (not the root
	// Cinder names, or malformed).
	corruptManifests atomic.Uint64
	manifestFrom     string // where the base's manifest came from (under peerNode.mu)
}

// peerTune, when set, adjusts memberlist (tests shorten its intervals).
var peerTune func(*memberlist.Config)

// startPeers joins the cluster and serves chunks, when [peers] is enabled.
func (d *Daemon) startPeers() error {
	pc := d.cfg.Peers
	if !pc.Enabled {
		return nil
	}
	id, err := peers.LoadIdentity(pc.CAFile, pc.CertFile, pc.KeyFile)
	if err != nil {
		return fmt.Errorf("[peers] ca_file/cert_file/key_file: %w", err)
	}
	var key []byte
	if pc.GossipKeyFile != "" {
		if key, err = readGossipKey(pc.GossipKeyFile); err != nil {
			return fmt.Errorf("[peers] gossip_key_file: %w", err)
		}
	}
	ln, err := net.Listen("tcp", pc.Listen)
	if err != nil {
		return fmt.Errorf("[peers] listen: %w", err)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	p := &peerNode{d: d, id: id, cl: peers.NewClient(id, peers.ClientOptions{}), originLimit: peers.NewLimiter(pc.OriginRate),
		traffic: peers.NewTraffic(), ln: ln, done: make(chan struct{}), bases: map[string]*peerBase{}, stats: map[string]*peerStats{}, reason: map[string]string{}, keys: map[string]peers.BaseKey{}, late: map[string]*lateSource{}}
	p.srv = peers.NewServer(id.Name, peers.ServerOptions{ServeLimit: peers.NewLimiter(pc.ServeRate), Trace: p.traceFile, Manifest: p.manifestFile, Traffic: p.traffic})
	if err := p.testFault(); err != nil {
		ln.Close()
		p.cl.Close()
		return err
	}
	p.ml, err = peers.JoinCluster(peers.MembershipOptions{Name: id.Name, Bind: pc.Bind, Advertise: pc.Advertise, Join: pc.Join,
		SecretKey: key, ChunkAddr: pc.ChunkAddr(port), LogOutput: d.log.WithField("component", "memberlist").WriterLevel(logrus.DebugLevel), Tune: peerTune,
		OnState: func(m peers.Member, from string) {
			d.log.WithFields(logrus.Fields{"member": m.Name, "state": m.State, "was": from, "gossip": m.Gossip, "bases": m.Bases}).Info("peers: member state")
		}})
	if err != nil {
		ln.Close()
		p.cl.Close()
		return fmt.Errorf("[peers]: %w", err)
	}
	// Per-member counters live as long as membership lists the member.
	p.ml.OnChange(func() { p.traffic.Retain(p.ml.Knows) })
	go func() {
		defer close(p.done)
		if err := p.srv.Serve(ln, id); err != nil {
			d.log.WithError(err).Error("peer chunk server stopped")
		}
	}()
	d.peers = p
	d.log.WithFields(logrus.Fields{"member": id.Name, "gossip": p.ml.GossipAddr(), "chunks": pc.ChunkAddr(port), "join": pc.Join}).Info("peers: joined")
	return nil
}

// TestFaultEnv names a test-only fault for a real daemon process (the
// many-node tests in tests/bulk): "corrupt-peer-chunks" makes this node's
// chunk server flip a byte in every chunk it serves, so the others must
// detect and drop them; "corrupt-peer-manifests", in every manifest it
// serves. Never set it in production.
const TestFaultEnv = "VMTHUNDER_TEST_FAULT"

func (p *peerNode) testFault() error {
	switch f := os.Getenv(TestFaultEnv); f {
	case "":
		return nil
	case "corrupt-peer-chunks":
		p.srv.SetCorrupt(true)
		p.d.log.WithField(TestFaultEnv, f).Error("TEST FAULT ON: this node serves corrupt chunks to its peers (testing only)")
		return nil
	case "corrupt-peer-manifests":
		p.srv.SetCorruptManifests(true)
		p.d.log.WithField(TestFaultEnv, f).Error("TEST FAULT ON: this node serves corrupt manifests to its peers (testing only)")
		return nil
	default:
		return fmt.Errorf("%s=%q: unknown test fault (known: corrupt-peer-chunks, corrupt-peer-manifests)", TestFaultEnv, f)
	}
}

// readGossipKey reads 16, 24 or 32 bytes: raw, base64 or hex.
func readGossipKey(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ok := func(b []byte) bool { return len(b) == 16 || len(b) == 24 || len(b) == 32 }
	t := bytes.TrimSpace(raw)
	if b, err := base64.StdEncoding.DecodeString(string(t)); err == nil && ok(b) {
		return b, nil
	}
	if b, err := hex.DecodeString(string(t)); err == nil && ok(b) {
		return b, nil
	}
	if ok(raw) {
		return raw, nil
	}
	return nil, fmt.Errorf("%s holds no key of 16, 24 or 32 bytes (raw, base64 or hex)", path)
}

// stopPeers leaves the cluster and stops serving chunks.
func (d *Daemon) stopPeers() {
	p := d.peers
	if p == nil {
		return
	}
	if err := p.ml.Leave(2 * time.Second); err != nil {
		d.log.WithError(err).Debug("peers: leave")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	p.srv.Shutdown(ctx)
	cancel()
	<-p.done
	p.cl.Close()
}

// statsOf is base id's counters, made on first use.
func (p *peerNode) statsOf(id string) *peerStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats[id]
	if st == nil {
		st = &peerStats{}
		p.stats[id] = st
	}
	return st
}

// source is stack.Options.PeerSource: a template base with a manifest
// fills through a peers.Source over its origin; without one, from the
// origin (and the base's API view says why).
func (p *peerNode) source(id string, bind cache.Binding, origin blockdev.Device) (blockdev.Device, error) {
	log := p.d.log.WithField("base", id)
	key := peers.BaseKey{ID: id, Template: bind.Template, Generation: bind.Generation}
	p.mu.Lock()
	p.keys[id] = key
	p.mu.Unlock()
	fromOrigin := func(why string) (blockdev.Device, error) {
		p.mu.Lock()
		p.reason[id] = why
		p.mu.Unlock()
		log.WithField("why", why).Info("peers: base fills from its origin only")
		return peers.LimitOrigin(origin, p.originLimit), nil
	}
	m, err := peers.ReadManifestFile(filepath.Join(p.d.mgr.Dir(), id, ManifestFile), "")
	switch {
	case errors.Is(err, os.ErrNotExist) && templateVolumeOf(bind.Template) != "" && p.d.cfg.Cinder != nil:
		return p.lateSource(id, templateVolumeOf(bind.Template), key, origin), nil // manifests.go
	case errors.Is(err, os.ErrNotExist):
		return fromOrigin("no manifest: import one (POST /v1/bases/" + id + "/manifest, vmthunder manifest import)")
	case err != nil:
		return fromOrigin(err.Error())
	}
	raw, _ := m.MarshalBinary()
	st := p.statsOf(id)
	src, err := peers.NewSource(origin, peers.SourceOptions{Key: key, Manifest: m, Members: p.ml, Fetcher: p.cl, Stats: &st.src, OriginLimit: p.originLimit, Traffic: p.traffic})
	if err != nil {
		return fromOrigin(err.Error())
	}
	pb := &peerBase{key: key, src: src, root: m.Root(), manifest: raw}
	p.mu.Lock()
	delete(p.reason, id)
	p.bases[id] = pb
	p.mu.Unlock()
	log.WithField("manifest", pb.root).Info("peers: base fills from peers")
	return &peerSourceDev{Device: src, close: func() { p.closed(id, pb) }}, nil
}

// peerSourceDev is a base's source; closing it (the base's last close)
// stops serving the base to peers first.
type peerSourceDev struct {
	blockdev.Device
	close func()
}

func (s *peerSourceDev) Unwrap() blockdev.Device { return s.Device }

func (s *peerSourceDev) Close() error {
	s.close()
	return s.Device.Close()
}

func (p *peerNode) closed(id string, pb *peerBase) {
	p.mu.Lock()
	un := pb.unregister
	if p.bases[id] == pb {
		delete(p.bases, id)
	}
	p.mu.Unlock()
	if un != nil {
		un()
		p.advertise()
	}
}

// serve answers peers for base id, open as ref, if it fills from peers.
// The chunk server reads through the base itself, not through ref: its
// reads are not counted as a guest's.
func (p *peerNode) serve(id string, ref *cache.Ref) {
	if p.pendingServe(id, ref.Base) { // manifests.go: served once its manifest arrives
		return
	}
	p.register(id, ref.Base)
}

// register serves open base id to peers, if it fills from peers.
func (p *peerNode) register(id string, base *cache.Base) {
	p.mu.Lock()
	pb := p.bases[id]
	if pb == nil || pb.unregister != nil {
		p.mu.Unlock()
		return
	}
	st := p.stats[id]
	un, err := p.srv.Register(pb.key, base.Size(), countingReader{pb.src.ServeFrom(baseView{base}), &st.served})
	if err == nil {
		pb.unregister = un
	}
	p.mu.Unlock()
	if err != nil {
		p.d.log.WithError(err).WithField("base", id).Warn("peers: could not serve base")
		return
	}
	p.advertise()
}

// advertise tells the cluster which bases this node serves.
func (p *peerNode) advertise() {
	keys := p.srv.Bases()
	ids := make([]string, 0, len(keys))
	for _, k := range keys {
		ids = append(ids, k.ID)
	}
	sort.Strings(ids)
	if err := p.ml.SetBases(ids); err != nil {
		p.d.log.WithError(err).Warn("peers: could not advertise bases")
	}
}

// baseView reads a base without holding a reference on it (the chunk
// server is unregistered before the base closes).
type baseView struct{ *cache.Base }

func (baseView) Close() error { return nil }

type countingReader struct {
	r peers.ChunkReader
	n *atomic.Uint64
}

func (c countingReader) ReadChunk(b []byte, off int64) error {
	err := c.r.ReadChunk(b, off)
	if err == nil {
		c.n.Add(uint64(len(b)))
	}
	return err
}

// ReadCachedChunk answers a peer's hedge from what the base holds only.
func (c countingReader) ReadCachedChunk(b []byte, off int64) error {
	cr, ok := c.r.(peers.CachedChunkReader)
	if !ok {
		return peers.ErrNotCached
	}
	err := cr.ReadCachedChunk(b, off)
	if err == nil {
		c.n.Add(uint64(len(b)))
	}
	return err
}

// traceFile is the chunk server's answer to GET /v1/trace: the stored
// boot trace of a base this node serves.
func (p *peerNode) traceFile(key peers.BaseKey) ([]byte, error) {
	t, err := prefetch.Load(filepath.Join(p.d.mgr.Dir(), key.ID))
	if err != nil {
		return nil, err
	}
	return t.Encode()
}

// maxTracePeers is how many members serving a base are asked for its trace.
const maxTracePeers = 3

// peerTrace is prefetch.Config.Fetch: a template base without a boot
// trace asks the members that serve it for theirs (over the chunk
// server's mutual TLS). A trace is decoded with its bounds and must be of
// a base of size bytes; it only orders prefetches (the bytes are verified
// below, by the manifest or from the origin), so a wrong one at worst
// wastes bandwidth within the lookahead until the replay backs off.
func (d *Daemon) peerTrace(id string, size int64) (*prefetch.Trace, string) {
	p := d.peers
	if p == nil {
		return nil, ""
	}
	p.mu.Lock()
	key, ok := p.keys[id]
	p.mu.Unlock()
	if !ok {
		return nil, ""
	}
	log := d.log.WithField("base", id)
	self, asked := p.ml.Self(), 0
	for _, peer := range p.ml.Serving(id) {
		if peer.Name == self || asked >= maxTracePeers {
			continue
		}
		asked++
		ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
		raw, err := p.cl.FetchTrace(ctx, peer, key)
		cancel()
		if err != nil {
			log.WithError(err).Debug("peers: no boot trace from peer")
			continue
		}
		t, err := prefetch.Decode(raw)
		if err == nil {
			err = t.Fits(size)
		}
		if err != nil {
			log.WithError(err).WithField("peer", peer.Name).Warn("peers: boot trace from peer refused")
			continue
		}
		return t, peer.Name
	}
	return nil, ""
}

// peerServe serves an export's or warm-up's template base to peers.
func (d *Daemon) peerServe(id string, ref *cache.Ref) {
	if d.peers != nil && ref != nil {
		d.peers.serve(id, ref)
	}
}

// peerSource is the stack's PeerSource hook, nil without peers.
func (d *Daemon) peerSource() func(string, cache.Binding, blockdev.Device) (blockdev.Device, error) {
	if d.peers == nil {
		return nil
	}
	return d.peers.source
}

// peerView fills in b.Peers for a template base when peers are enabled.
func (d *Daemon) peerView(b *api.Base) {
	p := d.peers
	if p == nil || !templateBaseID.MatchString(b.ID) {
		return
	}
	v := &api.BasePeers{Source: "origin"}
	p.mu.Lock()
	pb, why, st := p.bases[b.ID], p.reason[b.ID], p.stats[b.ID]
	p.mu.Unlock()
	switch {
	case pb != nil:
		v.Source, v.ManifestRoot = "peers", pb.root
	case why != "":
		v.Reason = why
	default:
		m, err := peers.ReadManifestFile(filepath.Join(d.mgr.Dir(), b.ID, ManifestFile), "")
		switch {
		case err == nil:
			v.Source, v.ManifestRoot = "peers", m.Root()
			v.Reason = "not open: fills from peers when opened"
		case errors.Is(err, os.ErrNotExist):
			v.Reason = "no manifest: import one (POST /v1/bases/" + b.ID + "/manifest, vmthunder manifest import)"
		default:
			v.Reason = err.Error()
		}
	}
	if st != nil {
		p.mu.Lock()
		v.ManifestFrom = st.manifestFrom
		p.mu.Unlock()
		v.CorruptManifests = st.corruptManifests.Load()
		v.FromOriginBytes, v.FromPeersBytes = st.src.BytesFromOrigin.Load(), st.src.BytesFromPeers.Load()
		v.ServedBytes, v.CorruptChunks = st.served.Load(), st.src.CorruptChunks.Load()
	}
	b.Peers = v
}

// ImportManifest stores raw (a manifest, see peers.Manifest) as template
// base id's manifest; wantRoot, when set, pins its root digest. It is
// used from the base's next open on.
func (d *Daemon) ImportManifest(id string, body io.Reader, wantRoot string) (*api.Manifest, error) {
	if err := api.ValidBase(id); err != nil {
		return nil, err
	}
	if !templateBaseID.MatchString(id) {
		return nil, api.BadRequest(api.CodeInvalid, "base %q is not a template generation (TEMPLATE.gHASH): only template bases are shared with peers, a volume's bytes never are", id)
	}
	raw, err := io.ReadAll(io.LimitReader(body, maxManifestBytes+1))
	if err != nil {
		return nil, api.BadRequest(api.CodeInvalid, "reading the manifest: %v", err)
	}
	if len(raw) > maxManifestBytes {
		return nil, api.Errorf(http.StatusRequestEntityTooLarge, api.CodeTooLarge, "manifest larger than %d bytes", maxManifestBytes)
	}
	m, err := peers.ParseManifest(raw)
	if err != nil {
		return nil, api.BadRequest(api.CodeInvalid, "%v", err)
	}
	if wantRoot != "" && m.Root() != wantRoot {
		return nil, api.BadRequest(api.CodeInvalid, "manifest root is %s, not %s", m.Root(), wantRoot)
	}
	if inf, ok := d.baseInfo(id); ok && inf.Size > 0 && inf.Size != m.Size {
		return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "base %s has %d bytes, the manifest is for %d", id, inf.Size, m.Size)
	}
	dir := filepath.Join(d.mgr.Dir(), id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, ManifestFile), raw, 0o600); err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	d.log.WithFields(logrus.Fields{"base": id, "root": m.Root(), "chunks": m.Chunks()}).Info("manifest imported")
	return &api.Manifest{Base: id, Root: m.Root(), Size: m.Size, ChunkSize: m.ChunkSize, Chunks: m.Chunks()}, nil
}

// Peers is this node's view of the cluster.
func (d *Daemon) Peers() api.Peers {
	p := d.peers
	if p == nil {
		return api.Peers{Members: []api.PeerMember{}}
	}
	out := api.Peers{Enabled: true, Self: p.ml.Self(), Members: []api.PeerMember{}}
	traffic := p.traffic.Members()
	for _, m := range p.ml.Members() {
		bases := m.Bases
		if bases == nil {
			bases = []string{}
		}
		t := traffic[m.Name]
		out.Members = append(out.Members, api.PeerMember{Name: m.Name, State: m.State, Since: m.Since.UTC(), Gossip: m.Gossip, ChunkAddr: m.ChunkAddr,
			Bases: bases, Self: m.Self, ReceivedBytes: t.Received, ServedBytes: t.Served})
	}
	return out
}

func (d *Daemon) peerRoutes(mux *http.ServeMux, v string) {
	mux.HandleFunc("GET "+v+"/peers", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.Peers())
	})
	mux.HandleFunc("POST "+v+"/bases/{id}/manifest", func(w http.ResponseWriter, r *http.Request) {
		m, err := d.ImportManifest(r.PathValue("id"), http.MaxBytesReader(w, r.Body, maxManifestBytes+1), r.URL.Query().Get("root"))
		answer(w, http.StatusOK, m, err)
	})
}
