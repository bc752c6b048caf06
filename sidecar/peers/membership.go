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
}

// Member is one member as gossip last described it.
type Member struct {
	Name      string
	Gossip    string   // gossip address
	ChunkAddr string   // chunk server address
	Bases     []string // template bases it has open, sorted
	Self      bool
}

// Membership is this node's view of the cluster, on hashicorp/memberlist:
// the live members, the address of each one's chunk server and the
// template bases each has open (in its node metadata). It is the Members
// a Source ranks chunk homes over.
type Membership struct {
	ml   *memberlist.Memberlist
	self string

	mu        sync.RWMutex
	chunkAddr string
	bases     []string // own, sorted
	meta      []byte   // own, encoded
	truncated int      // own bases left out of the metadata (too many)
	view      map[string]Member
	onChange  []func()
}

// metaVersion leads the node metadata, so a later format can be told apart.
const metaVersion = 1

// JoinCluster starts gossip as o.Name and joins o.Join (if any).
func JoinCluster(o MembershipOptions) (*Membership, error) {
	if err := validName(o.Name); err != nil {
		return nil, fmt.Errorf("peers membership: %w", err)
	}
	if _, _, err := net.SplitHostPort(o.ChunkAddr); err != nil {
		return nil, fmt.Errorf("peers membership: chunk server address %q: %w", o.ChunkAddr, err)
	}
	m := &Membership{self: o.Name, chunkAddr: o.ChunkAddr, view: map[string]Member{}}
	m.meta, m.truncated = encodeMeta(o.ChunkAddr, nil, memberlist.MetaMaxSize)

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
	if o.Tune != nil {
		o.Tune(c)
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
	m.meta, m.truncated = encodeMeta(m.chunkAddr, ids, memberlist.MetaMaxSize)
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

// Members lists the live members (this node too), sorted by name.
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

// Serving lists the live members that advertise base, this node included.
func (m *Membership) Serving(base string) []Peer {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []Peer
	for _, mb := range m.view {
		if _, ok := slices.BinarySearch(mb.Bases, base); ok {
			out = append(out, Peer{Name: mb.Name, Addr: mb.ChunkAddr})
		}
	}
	return out
}

// Leave tells the others this node is going, then stops gossip.
func (m *Membership) Leave(timeout time.Duration) error {
	err := m.ml.Leave(timeout)
	return errors.Join(err, m.ml.Shutdown())
}

// Shutdown stops gossip without a word (the others find out by probing,
// as after a crash).
func (m *Membership) Shutdown() error { return m.ml.Shutdown() }

// encodeMeta: version, chunk address, then base ids, each prefixed by its
// length (uvarint), cut to fit limit. It returns how many ids were left out.
func encodeMeta(addr string, ids []string, limit int) ([]byte, int) {
	b := []byte{metaVersion}
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
func decodeMeta(b []byte) (addr string, ids []string, err error) {
	if len(b) == 0 || b[0] != metaVersion {
		return "", nil, errors.New("unknown metadata version")
	}
	b = b[1:]
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
		return "", nil, err
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", nil, fmt.Errorf("chunk address %q: %w", addr, err)
	}
	for len(b) > 0 {
		id, err := next()
		if err != nil {
			return "", nil, err
		}
		if cache.ValidID(id) != nil {
			return "", nil, fmt.Errorf("base id %q", id)
		}
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return addr, ids, nil
}

type metaDelegate Membership

func (d *metaDelegate) NodeMeta(limit int) []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if len(d.meta) > limit {
		b, _ := encodeMeta(d.chunkAddr, d.bases, limit)
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
	mb := Member{Name: n.Name, Gossip: n.Address()}
	addr, ids, err := decodeMeta(n.Meta)
	if err == nil && validName(n.Name) == nil {
		mb.ChunkAddr, mb.Bases = addr, ids
	}
	e.mu.Lock()
	e.view[n.Name] = mb
	fs := slices.Clone(e.onChange)
	e.mu.Unlock()
	e.notify(fs)
}

func (e *eventDelegate) notify(fs []func()) {
	for _, f := range fs {
		go f()
	}
}

func (e *eventDelegate) NotifyJoin(n *memberlist.Node)   { e.set(n) }
func (e *eventDelegate) NotifyUpdate(n *memberlist.Node) { e.set(n) }
func (e *eventDelegate) NotifyLeave(n *memberlist.Node) {
	e.mu.Lock()
	delete(e.view, n.Name)
	fs := slices.Clone(e.onChange)
	e.mu.Unlock()
	e.notify(fs)
}
