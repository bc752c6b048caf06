package peers

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// MembershipOptions configure a node's place in the gossip cluster.
type MembershipOptions struct {
	// Name is the member name: the common name of the node's TLS
	// certificate, unique in the cluster.
	Name string
	// Bind is the gossip address (UDP and TCP), host:port; port 0 picks
	// one. Advertise, when set, is the address other members reach it at.
	Bind, Advertise string
	// Join is a seed list of members' gossip addresses; empty: start a
	// cluster.
	Join []string
	// SecretKey encrypts gossip (AES, 16, 24 or 32 bytes); nil: clear.
	SecretKey []byte
	// ChunkAddr is the address of this node's chunk server, advertised to
	// the others.
	ChunkAddr string
	// LogOutput receives memberlist's log; nil: discarded.
	LogOutput io.Writer
	// Tune, when set, adjusts memberlist's configuration (tests shorten
	// its intervals).
	Tune func(*memberlist.Config)
	// ForgetAfter is how long a member that died or left is still listed
	// (default 5 minutes); then it is forgotten, with its counters.
	ForgetAfter time.Duration
	// OnState, when set, is told of every member that enters a state (from
	// is "" for one not known before), in order. It runs under the
	// membership's and maybe memberlist's lock: it must be quick (a log
	// line) and call neither.
	OnState func(m Member, from string)
}

// Member states (memberstate.go): alive; suspect (this node's memberlist
// probe got no ack, it is not yet declared dead: still a home, since it
// may well answer); dead (declared failed by memberlist); left (announced
// its leave).
const (
	StateAlive   = "alive"
	StateSuspect = "suspect"
	StateDead    = "dead"
	StateLeft    = "left"
)

// States lists the member states in a fixed order.
var States = []string{StateAlive, StateSuspect, StateDead, StateLeft}

// Member is one member as gossip last described it.
type Member struct {
	Name      string
	Gossip    string   // gossip address
	ChunkAddr string   // chunk server address
	Bases     []string // template bases it has open (last known), sorted
	Self      bool
	// State is one of States; Since is when this node saw it enter it.
	State string
	Since time.Time

	leaving bool // its metadata says it is leaving
}

// Live reports whether the member counts as a home (alive or suspect).
func (m Member) Live() bool { return m.State == StateAlive || m.State == StateSuspect }

// Membership is this node's view of the cluster, on hashicorp/memberlist:
// the live members, the address of each one's chunk server and the
// template bases each has open (in its node metadata). It is the Members
// a Source ranks chunk homes over.
type Membership struct {
	ml   *memberlist.Memberlist
	self string

	mu        sync.RWMutex
	chunkAddr string
	bases     []string          // own, sorted
	meta      []byte            // own, encoded
	truncated int               // own bases left out of the metadata (too many)
	leaving   bool              // own: Leave has begun
	view      map[string]Member // live members, and gone ones until forgotten
	onChange  []func()

	forgetAfter time.Duration
	onState     func(Member, string)
	stop        chan struct{}
	stopOnce    sync.Once
}

// metaVersion leads the node metadata, so a later format can be told
// apart. Version 2 added the flags byte.
const metaVersion = 2

// metaLeaving flags a member that is leaving: its departure that follows
// is a leave, not a failure.
const metaLeaving = 1

// JoinCluster starts gossip as o.Name and joins o.Join (if any).
func JoinCluster(o MembershipOptions) (*Membership, error) {
	if err := validName(o.Name); err != nil {
		return nil, fmt.Errorf("peers membership: %w", err)
	}
	if _, _, err := net.SplitHostPort(o.ChunkAddr); err != nil {
		return nil, fmt.Errorf("peers membership: chunk server address %q: %w", o.ChunkAddr, err)
	}
	m := &Membership{self: o.Name, chunkAddr: o.ChunkAddr, view: map[string]Member{}, forgetAfter: o.ForgetAfter, onState: o.OnState, stop: make(chan struct{})}
	if m.forgetAfter <= 0 {
		m.forgetAfter = 5 * time.Minute
	}
	m.meta, m.truncated = encodeMeta(o.ChunkAddr, nil, false, memberlist.MetaMaxSize)

	c := memberlist.DefaultLANConfig()
	c.Name = o.Name
	host, port, err := splitAddr(o.Bind)
	if err != nil {
		return nil, fmt.Errorf("peers membership: bind %q: %w", o.Bind, err)
	}
	c.BindAddr, c.BindPort, c.AdvertisePort = host, port, port
	if o.Advertise != "" {
		if c.AdvertiseAddr, c.AdvertisePort, err = splitAddr(o.Advertise); err != nil {
			return nil, fmt.Errorf("peers membership: advertise %q: %w", o.Advertise, err)
		}
	}
	if len(o.SecretKey) > 0 {
		switch len(o.SecretKey) {
		case 16, 24, 32:
		default:
			return nil, fmt.Errorf("peers membership: gossip key of %d bytes (want 16, 24 or 32)", len(o.SecretKey))
		}
		c.SecretKey = o.SecretKey
	}
	c.Delegate = (*metaDelegate)(m)
	c.Events = (*eventDelegate)(m)
	c.LogOutput = o.LogOutput
	if c.LogOutput == nil {
		c.LogOutput = io.Discard
	}
	c.Ping = (*pingDelegate)(m)
	if o.Tune != nil {
		o.Tune(c)
	}
	if c.Logger == nil {
		c.LogOutput = suspicionLog{m: m, out: c.LogOutput}
	}
	ml, err := memberlist.Create(c)
	if err != nil {
		return nil, fmt.Errorf("peers membership: %w", err)
	}
	m.ml = ml
	if len(o.Join) > 0 {
		if _, err := ml.Join(o.Join); err != nil {
			ml.Shutdown()
			return nil, fmt.Errorf("peers membership: join %v: %w", o.Join, err)
		}
	}
	go m.forget(min(max(m.forgetAfter/4, 20*time.Millisecond), 10*time.Second))
	return m, nil
}

func splitAddr(a string) (string, int, error) {
	host, p, err := net.SplitHostPort(a)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("port %q", p)
	}
	return host, port, nil
}

// GossipAddr is the address this node gossips on (the one to put in
// other members' join lists).
func (m *Membership) GossipAddr() string { return m.ml.LocalNode().Address() }

// Self is this node's member name.
func (m *Membership) Self() string { return m.self }

// SetBases advertises the template bases this node has open (their ids):
// the others rank this node among the homes of their chunks. Metadata is
// at most 512 bytes, so a node with very many bases open advertises the
// first ones in sorted order (Truncated says how many were left out); every
// node sees the same list, so homes stay consistent.
func (m *Membership) SetBases(ids []string) error {
	ids = slices.Clone(ids)
	sort.Strings(ids)
	ids = slices.Compact(ids)
	for _, id := range ids {
		if err := cache.ValidID(id); err != nil {
			return err
		}
	}
	m.mu.Lock()
	if slices.Equal(ids, m.bases) {
		m.mu.Unlock()
		return nil
	}
	m.bases = ids
	m.meta, m.truncated = encodeMeta(m.chunkAddr, ids, m.leaving, memberlist.MetaMaxSize)
	m.mu.Unlock()
	return m.ml.UpdateNode(2 * time.Second)
}

// Truncated is how many of this node's bases did not fit its metadata.
func (m *Membership) Truncated() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.truncated
}

// OnChange calls f (on a goroutine of its own) after every change of a
// member: join, leave, failure, new metadata.
func (m *Membership) OnChange(f func()) {
	m.mu.Lock()
	m.onChange = append(m.onChange, f)
	m.mu.Unlock()
}

// Members lists the members (this node too), live or gone but not yet
// forgotten, sorted by name.
func (m *Membership) Members() []Member {
	m.mu.RLock()
	out := make([]Member, 0, len(m.view))
	for _, mb := range m.view {
		mb.Self = mb.Name == m.self
		out = append(out, mb)
	}
	m.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Knows reports whether name is a member, live or not yet forgotten.
func (m *Membership) Knows(name string) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	_, ok := m.view[name]
	return ok
}

// Serving lists the live members (alive or suspect) that advertise base,
// this node included: a dead or departed member is never a home.
func (m *Membership) Serving(base string) []Peer {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []Peer
	for _, mb := range m.view {
		if !mb.Live() {
			continue
		}
		if _, ok := slices.BinarySearch(mb.Bases, base); ok {
			out = append(out, Peer{Name: mb.Name, Addr: mb.ChunkAddr})
		}
	}
	return out
}

// Leave tells the others this node is going (first in its metadata, so
// they list it as left, not dead), then stops gossip.
func (m *Membership) Leave(timeout time.Duration) error {
	m.stopWatch()
	m.mu.Lock()
	m.leaving = true
	m.meta, m.truncated = encodeMeta(m.chunkAddr, m.bases, true, memberlist.MetaMaxSize)
	m.mu.Unlock()
	m.ml.UpdateNode(timeout / 2) // best effort: without it, the others say dead
	err := m.ml.Leave(timeout)
	return errors.Join(err, m.ml.Shutdown())
}

// Shutdown stops gossip without a word (the others find out by probing,
// as after a crash).
func (m *Membership) Shutdown() error {
	m.stopWatch()
	return m.ml.Shutdown()
}

// encodeMeta: version, flags, chunk address, then base ids, each prefixed
// by its length (uvarint), cut to fit limit. It returns how many ids were
// left out.
func encodeMeta(addr string, ids []string, leaving bool, limit int) ([]byte, int) {
	var flags byte
	if leaving {
		flags |= metaLeaving
	}
	b := []byte{metaVersion, flags}
	b = binary.AppendUvarint(b, uint64(len(addr)))
	b = append(b, addr...)
	for i, id := range ids {
		if len(b)+binary.MaxVarintLen16+len(id) > limit {
			return b, len(ids) - i
		}
		b = binary.AppendUvarint(b, uint64(len(id)))
		b = append(b, id...)
	}
	return b, 0
}

// decodeMeta reads another member's metadata; anything malformed is an
// error (the member is then not used as a home).
func decodeMeta(b []byte) (addr string, ids []string, leaving bool, err error) {
	if len(b) < 2 || b[0] != metaVersion {
		return "", nil, false, errors.New("unknown metadata version")
	}
	if b[1]&^metaLeaving != 0 {
		return "", nil, false, fmt.Errorf("unknown metadata flags %#x", b[1])
	}
	leaving = b[1]&metaLeaving != 0
	b = b[2:]
	next := func() (string, error) {
		n, k := binary.Uvarint(b)
		if k <= 0 || n > uint64(len(b)-k) {
			return "", errors.New("truncated metadata")
		}
		s := string(b[k : k+int(n)])
		b = b[k+int(n):]
		return s, nil
	}
	if addr, err = next(); err != nil {
		return "", nil, false, err
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", nil, false, fmt.Errorf("chunk address %q: %w", addr, err)
	}
	for len(b) > 0 {
		id, err := next()
		if err != nil {
			return "", nil, false, err
		}
		if cache.ValidID(id) != nil {
			return "", nil, false, fmt.Errorf("base id %q", id)
		}
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return addr, ids, leaving, nil
}

type metaDelegate Membership

func (d *metaDelegate) NodeMeta(limit int) []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if len(d.meta) > limit {
		b, _ := encodeMeta(d.chunkAddr, d.bases, d.leaving, limit)
		return b
	}
	return slices.Clone(d.meta)
}
func (d *metaDelegate) NotifyMsg([]byte)                           {}
func (d *metaDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *metaDelegate) LocalState(join bool) []byte                { return nil }
func (d *metaDelegate) MergeRemoteState(buf []byte, join bool)     {}

// eventDelegate keeps the view. memberlist calls it with its own lock
// held, so it must not call back into memberlist.
type eventDelegate Membership

func (e *eventDelegate) set(n *memberlist.Node) {
	mb := Member{Name: n.Name, Gossip: n.Address(), State: StateAlive, Since: time.Now()}
	addr, ids, leaving, err := decodeMeta(n.Meta)
	if err == nil && validName(n.Name) == nil {
		mb.ChunkAddr, mb.Bases, mb.leaving = addr, ids, leaving
	}
	e.mu.Lock()
	old, ok := e.view[n.Name]
	if ok && old.State == mb.State {
		mb.Since = old.Since // new metadata, same state
	}
	e.view[n.Name] = mb
	if old.State != mb.State {
		e.stateChanged(mb, old.State)
	}
	fs := slices.Clone(e.onChange)
	e.mu.Unlock()
	e.notify(fs)
}

// stateChanged tells OnState, with e.mu held (so in order).
func (e *eventDelegate) stateChanged(mb Member, from string) {
	if e.onState != nil {
		mb.Self = mb.Name == e.self
		e.onState(mb, from)
	}
}

func (e *eventDelegate) notify(fs []func()) {
	for _, f := range fs {
		go f()
	}
}

func (e *eventDelegate) NotifyJoin(n *memberlist.Node)   { e.set(n) }
func (e *eventDelegate) NotifyUpdate(n *memberlist.Node) { e.set(n) }

// NotifyLeave keeps the member, dead or left, with its last addresses
// and bases, until it is forgotten. memberlist (v0.7.0) does not fill in
// Node.State, so a leave is told from a failure by the member's own
// metadata, flagged by Leave.
func (e *eventDelegate) NotifyLeave(n *memberlist.Node) {
	e.mu.Lock()
	mb, ok := e.view[n.Name]
	if !ok {
		mb = Member{Name: n.Name, Gossip: n.Address()}
	}
	from := mb.State
	mb.State, mb.Since = StateDead, time.Now()
	if _, _, leaving, err := decodeMeta(n.Meta); (err == nil && leaving) || mb.leaving {
		mb.State = StateLeft
	}
	e.view[n.Name] = mb
	e.stateChanged(mb, from)
	fs := slices.Clone(e.onChange)
	e.mu.Unlock()
	e.notify(fs)
}
