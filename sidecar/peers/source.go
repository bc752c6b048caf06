package peers

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// Members is what a Source needs of membership.
type Members interface {
	// Self is this node's member name.
	Self() string
	// Serving lists the live members that have base open (this node may
	// be among them), with their chunk servers' addresses.
	Serving(base string) []Peer
}

// Fetcher fetches one chunk from a peer (Client does, over mutual TLS).
type Fetcher interface {
	Fetch(ctx context.Context, peer Peer, req Request, p []byte) error
}

// SourceOptions configure a Source.
type SourceOptions struct {
	Key BaseKey
	// Manifest holds the digest of every chunk of Key's generation; its
	// trust must not come from a peer (see Manifest). Its chunk is the
	// unit asked from peers.
	Manifest *Manifest
	Members  Members
	Fetcher  Fetcher
	// MaxAttempts is how many peers are asked to fill a chunk before the
	// origin (default 2: the home and the next candidate); the
	// cached-only hedges of a HedgingFetcher come on top (hedge.go).
	MaxAttempts int
	// Cooldown is how long a peer that failed twice in a row, or
	// answered with bytes that fail verification, is skipped (default
	// 3 s); then it is asked again.
	Cooldown time.Duration
	// OriginLimit, when set, caps the bytes read from the origin per
	// second ([peers] origin_rate; one limiter for every source of the
	// node). Guest misses and prefetch fills both come through here.
	OriginLimit *rate.Limiter
	// Stats, when set, is where the source counts (several sources may
	// share one); nil: its own.
	Stats *SourceStats
	// Traffic, when set, counts the verified bytes read from each member
	// and times every fetch by outcome (one for every source of the node).
	Traffic *Traffic
}

// SourceStats are a Source's counters; the fields are safe to read while
// sources count.
type SourceStats struct {
	// ChunksFromPeers counts the chunks read from peers, BytesFromPeers
	// the verified bytes received from them (with HedgeWasteBytes).
	ChunksFromPeers, BytesFromPeers   atomic.Uint64
	ChunksFromOrigin, BytesFromOrigin atomic.Uint64
	// CorruptChunks counts chunks from peers that failed verification
	// against the manifest and were dropped.
	CorruptChunks atomic.Uint64
	// PeerErrors counts requests that failed (no answer in time, refused,
	// an error answer); PeerSkipped, peers skipped while cooling down.
	PeerErrors, PeerSkipped atomic.Uint64
	// PeerFetchNanos and PeerFetches time the successful fetches.
	PeerFetchNanos, PeerFetches atomic.Uint64
	// Hedges counts hedged requests (see fromPeers), HedgeWins the chunks
	// a hedge answered, NotHeld the cached-only hedges a peer could not
	// answer. HedgeWasteBytes are the verified bytes of answers that came
	// after the chunk was had from another request (they are in
	// BytesFromPeers too: the bytes received).
	Hedges, HedgeWins, NotHeld, HedgeWasteBytes atomic.Uint64
}

// Source is the device a template base's cache fills from: a chunk is
// asked from the members that have the base open, highest rendezvous
// weight first (the chunk's home, then the next candidates), until this
// node's own weight is reached or MaxAttempts peers were asked; then the
// origin. A request not answered within the hedge delay is hedged (see
// hedge.go). Every chunk from a peer is verified against the manifest
// before it is returned; a peer that times out, errs or sends bad bytes
// is skipped for the next candidate or the origin, so a read fails only
// if the origin fails. Reads that are not whole manifest chunks go straight
// to the origin.
//
// Source is read-only and owns the origin (Close closes it).
type Source struct {
	origin blockdev.Device
	o      SourceOptions
	stats  *SourceStats

	mu    sync.Mutex
	local map[int64]int // chunks being read for a peer: origin only
	down  sync.Map      // member name -> time.Time it is skipped until
	fails sync.Map      // member name -> *atomic.Int32, failures in a row
	lat   latencyWindow // successful fetch times, for the hedge delay
	bufs  sync.Pool     // *[]byte, one per request in flight
}

// NewSource makes a peer source over origin for o.Key.
func NewSource(origin blockdev.Device, o SourceOptions) (*Source, error) {
	if err := o.Key.validate(); err != nil {
		return nil, fmt.Errorf("peers: source: %w", err)
	}
	switch {
	case o.Manifest == nil:
		return nil, fmt.Errorf("%w: base %s has no manifest: chunks from peers could not be verified", ErrManifest, o.Key.ID)
	case o.Manifest.Size != origin.Size():
		return nil, fmt.Errorf("%w: manifest of base %s is for %d bytes, the origin has %d", ErrManifest, o.Key.ID, o.Manifest.Size, origin.Size())
	case o.Members == nil || o.Fetcher == nil:
		return nil, fmt.Errorf("%w: peer source without members or fetcher", blockdev.ErrInvalid)
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 2
	}
	if o.Cooldown <= 0 {
		o.Cooldown = 3 * time.Second
	}
	st := o.Stats
	if st == nil {
		st = &SourceStats{}
	}
	return &Source{origin: origin, o: o, stats: st, local: map[int64]int{}}, nil
}

// Stats are the source's counters.
func (s *Source) Stats() *SourceStats { return s.stats }

// Key is the base the source reads.
func (s *Source) Key() BaseKey { return s.o.Key }

func (s *Source) Size() int64 { return s.origin.Size() }

func (s *Source) ReadAt(p []byte, off int64) (int, error) {
	size := s.origin.Size()
	if err := blockdev.CheckRange(size, off, int64(len(p))); err != nil {
		return 0, err
	}
	cs, end := s.o.Manifest.ChunkSize, off+int64(len(p))
	if len(p) == 0 || off%cs != 0 || (end%cs != 0 && end != size) {
		return s.fromOrigin(p, off)
	}
	for done := int64(0); done < int64(len(p)); {
		c := (off + done) / cs
		_, n := s.o.Manifest.Span(c)
		if err := s.readChunk(c, p[done:done+n], off+done); err != nil {
			return int(done), err
		}
		done += n
	}
	return len(p), nil
}

func (s *Source) fromOrigin(p []byte, off int64) (int, error) {
	if err := WaitBytes(context.Background(), s.o.OriginLimit, len(p)); err != nil {
		return 0, err
	}
	n, err := s.origin.ReadAt(p, off)
	if err == nil {
		s.stats.BytesFromOrigin.Add(uint64(n))
	}
	return n, err
}

func (s *Source) readChunk(c int64, q []byte, off int64) error {
	if !s.isLocal(c) {
		if s.fromPeers(c, q) {
			return nil
		}
	}
	if _, err := s.fromOrigin(q, off); err != nil {
		return err
	}
	s.stats.ChunksFromOrigin.Add(1)
	return nil
}

func (s *Source) isLocal(c int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.local[c] > 0
}

func (s *Source) markLocal(first, last int64, d int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := first; c <= last; c++ {
		if s.local[c] += d; s.local[c] <= 0 {
			delete(s.local, c)
		}
	}
}

// ServeFrom is the ChunkReader a Server answers peers with for this
// source's base: it reads through dev (the cache filled from this
// source), and a chunk that this read makes dev fill comes from the
// origin, never from another peer — the home fills a chunk once from its
// own origin, and a request never travels on.
func (s *Source) ServeFrom(dev blockdev.Device) ChunkReader {
	return serveFrom{s: s, dev: dev}
}

type serveFrom struct {
	s   *Source
	dev blockdev.Device
}

// ReadCachedChunk reads a chunk only if dev holds all of it
// (CachedChunkReader): a hedge never makes this node read its origin.
func (r serveFrom) ReadCachedChunk(p []byte, off int64) error {
	h, ok := r.dev.(holder)
	if !ok || len(p) == 0 {
		return ErrNotCached
	}
	cs := h.ChunkSize()
	for c := off / cs; c <= (off+int64(len(p))-1)/cs; c++ {
		if !h.Present(c) {
			return ErrNotCached
		}
	}
	return r.ReadChunk(p, off)
}

// holder is a cache that tells which of its chunks it holds.
type holder interface {
	ChunkSize() int64
	Present(chunk int64) bool
}

func (r serveFrom) ReadChunk(p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	cs := r.s.o.Manifest.ChunkSize
	first, last := off/cs, (off+int64(len(p))-1)/cs
	r.s.markLocal(first, last, 1)
	defer r.s.markLocal(first, last, -1)
	_, err := r.dev.ReadAt(p, off)
	return err
}

func (s *Source) WriteAt(p []byte, off int64) (int, error) { return 0, blockdev.ErrReadOnly }
func (s *Source) Flush() error                             { return nil }
func (s *Source) Trim(off, length int64) error             { return blockdev.ErrReadOnly }
func (s *Source) WriteZeroes(off, length int64) error      { return blockdev.ErrReadOnly }
func (s *Source) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	return s.origin.BlockStatus(off, length)
}
func (s *Source) Prefetch(off, length int64) error { return blockdev.CheckRange(s.Size(), off, length) }
func (s *Source) Caps() blockdev.Caps {
	c := s.origin.Caps()
	c.ReadOnly, c.Trim, c.WriteZeroes, c.FastZero, c.Prefetch = true, false, false, false, false
	return c
}
func (s *Source) Close() error { return s.origin.Close() }

// LimitOrigin caps the reads of origin at l's rate (nil l: origin
// itself): the origin of a template base that fills without peers obeys
// [peers] origin_rate too. The result has no asynchronous read path, so
// every read passes the limiter.
func LimitOrigin(origin blockdev.Device, l *rate.Limiter) blockdev.Device {
	if l == nil {
		return origin
	}
	return &limitedDev{Device: origin, l: l}
}

type limitedDev struct {
	blockdev.Device
	l *rate.Limiter
}

func (d *limitedDev) ReadAt(p []byte, off int64) (int, error) {
	if err := WaitBytes(context.Background(), d.l, len(p)); err != nil {
		return 0, err
	}
	return d.Device.ReadAt(p, off)
}

// StaticMembers is a fixed member list (tests, or a cluster without
// gossip): every member serves every base.
type StaticMembers struct {
	Me    string
	Peers []Peer
}

func (m StaticMembers) Self() string               { return m.Me }
func (m StaticMembers) Serving(base string) []Peer { return m.Peers }
