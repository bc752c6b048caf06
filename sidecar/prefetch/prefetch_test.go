package prefetch

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/layer/delay"
)

const chunk = 64 << 10

var bind = cache.Binding{Template: "tmpl", Generation: "1", Origin: "path:/img"}

// origin counts and orders the chunk reads that reach it; with lane set,
// one read at a time (a link of limited bandwidth), each taking lane.
type origin struct {
	blockdev.Device
	mu    sync.Mutex
	reads []int64
	lane  sync.Mutex
	slow  bool
}

func newOrigin(chunks int, lat time.Duration) *origin {
	mem := memdev.New(int64(chunks) * chunk)
	for i := range mem.Bytes() {
		mem.Bytes()[i] = byte(i / chunk)
	}
	o := &origin{Device: mem}
	if lat > 0 {
		o.Device, o.slow = delay.New(mem, lat, 0), true
	}
	return o
}

func (o *origin) ReadAt(p []byte, off int64) (int, error) {
	if o.slow {
		o.lane.Lock()
		defer o.lane.Unlock()
	}
	o.mu.Lock()
	o.reads = append(o.reads, off/chunk)
	o.mu.Unlock()
	return o.Device.ReadAt(p, off)
}

func (o *origin) Close() error { return nil }

func (o *origin) got() []int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]int64(nil), o.reads...)
}

// node is one cache directory with a prefetch manager.
type node struct {
	t   *testing.T
	dir string
	cm  *cache.Manager
	pm  *Manager
}

func newNode(t *testing.T, cfg Config) *node {
	dir := t.TempDir()
	cm, err := cache.NewManager(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	return &node{t: t, dir: dir, cm: cm, pm: NewManager(cfg)}
}

// open attaches an export of base "b" over o.
func (n *node) open(o *origin) (blockdev.Device, *cache.Ref) {
	n.t.Helper()
	ref, err := n.cm.Open("b", bind, o, chunk)
	if err != nil {
		n.t.Fatal(err)
	}
	return n.pm.Attach("b", ref), ref
}

// putTrace stores a trace of chunks for a base of size bytes before the
// base is first opened on this node (an imported trace).
func (n *node) putTrace(size int64, chunks ...int64) {
	n.t.Helper()
	dir := filepath.Join(n.dir, "b")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		n.t.Fatal(err)
	}
	t := &Trace{ChunkSize: chunk, Size: size, Chunks: chunks, MS: make([]uint32, len(chunks))}
	if err := Save(dir, t); err != nil {
		n.t.Fatal(err)
	}
}

func read(t *testing.T, d blockdev.Device, c int64) {
	t.Helper()
	p := make([]byte, 4096)
	if _, err := d.ReadAt(p, c*chunk+100); err != nil {
		t.Fatal(err)
	}
	if p[0] != byte(c) {
		t.Fatalf("chunk %d reads %d", c, p[0])
	}
}

// settle waits until the replay stops fetching, and returns its counters.
func (n *node) settle() Stats {
	n.t.Helper()
	last, since := n.pm.Stats("b"), time.Now()
	for time.Since(since) < 300*time.Millisecond {
		time.Sleep(20 * time.Millisecond)
		if s := n.pm.Stats("b"); s != last {
			last, since = s, time.Now()
		}
	}
	return last
}

func seq(from, to int64) []int64 {
	var s []int64
	for c := from; c < to; c++ {
		s = append(s, c)
	}
	return s
}

func TestTraceEncodeDecode(t *testing.T) {
	tr := &Trace{ChunkSize: chunk, Size: 100*chunk - 7, Chunks: []int64{5, 2, 99, 0}, MS: []uint32{0, 3, 3, 900}}
	raw, err := tr.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(raw)
	if err != nil {
		t.Fatal(err)
	}
	if got.Size != tr.Size || got.ChunkSize != tr.ChunkSize || len(got.Chunks) != 4 || got.Chunks[2] != 99 || got.MS[3] != 900 {
		t.Fatalf("decoded %+v, want %+v", got, tr)
	}
	if got.Bytes() != 4*chunk-7 {
		t.Fatalf("bytes %d", got.Bytes())
	}
	raw[len(raw)-6] ^= 1
	if _, err := Decode(raw); !errors.Is(err, ErrFormat) {
		t.Fatalf("a damaged trace decodes: %v", err)
	}
	for _, bad := range []*Trace{
		{ChunkSize: chunk, Size: 10 * chunk, Chunks: []int64{1, 1}, MS: []uint32{0, 0}},
		{ChunkSize: chunk, Size: 10 * chunk, Chunks: []int64{10}, MS: []uint32{0}},
		{ChunkSize: 1000, Size: 10 * chunk, Chunks: []int64{1}, MS: []uint32{0}},
		{ChunkSize: chunk, Size: 10 * chunk, Chunks: []int64{1, 2}, MS: []uint32{5, 4}},
	} {
		if _, err := bad.Encode(); !errors.Is(err, ErrFormat) {
			t.Errorf("trace %+v encodes: %v", bad, err)
		}
	}
	// In the cache's chunks: a 64 KiB trace over 256 KiB chunks.
	c, _ := (&Trace{ChunkSize: chunk, Size: 64 * chunk, Chunks: []int64{9, 0, 8, 1, 33}, MS: make([]uint32, 5)}).Rechunk(4 * chunk)
	if want := []int64{2, 0, 8}; len(c) != 3 || c[0] != want[0] || c[1] != want[1] || c[2] != want[2] {
		t.Fatalf("rechunked %v, want %v", c, want)
	}
}

// A first boot records its first reads in order; the next cold boot on
// another node fetches them in that order ahead of the guest, and the
// guest's reads of them are hits.
func TestRecordAndReplayOrder(t *testing.T) {
	a := newNode(t, Config{Concurrency: 1})
	o := newOrigin(64, 0)
	dev, _ := a.open(o)
	order := []int64{17, 3, 40, 4, 63, 0}
	for _, c := range order {
		read(t, dev, c)
		read(t, dev, c) // a second read is no new entry
	}
	if s := a.pm.Stats("b"); !s.Recording {
		t.Fatalf("not recording: %+v", s)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	tr, err := Load(filepath.Join(a.dir, "b"))
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.Chunks) != len(order) {
		t.Fatalf("recorded %v, want %v", tr.Chunks, order)
	}
	for i := range order {
		if tr.Chunks[i] != order[i] {
			t.Fatalf("recorded %v, want %v", tr.Chunks, order)
		}
	}

	b := newNode(t, Config{Concurrency: 1})
	raw, _ := tr.Encode()
	os.MkdirAll(filepath.Join(b.dir, "b"), 0o700)
	os.WriteFile(Path(filepath.Join(b.dir, "b")), raw, 0o600)
	o2 := newOrigin(64, 0)
	dev2, _ := b.open(o2)
	s := b.settle()
	if got := o2.got(); len(got) != len(order) {
		t.Fatalf("the replay fetched %v, want %v", got, order)
	} else {
		for i := range order {
			if got[i] != order[i] {
				t.Fatalf("the replay fetched %v, want %v", got, order)
			}
		}
	}
	for _, c := range order {
		read(t, dev2, c)
	}
	s = b.pm.Stats("b")
	if s.Prefetched != uint64(len(order)) || s.Hits != uint64(len(order)) || s.Recording {
		t.Fatalf("stats %+v", s)
	}
	if len(o2.got()) != len(order) {
		t.Fatalf("the guest's reads reached the origin: %v", o2.got())
	}
	dev2.Close()
	if s := b.pm.Stats("b"); s.WastedBytes != 0 {
		t.Fatalf("wasted %d", s.WastedBytes)
	}
}

// The replay runs at most Lookahead entries ahead of the furthest trace
// entry the guest has read.
func TestLookaheadBound(t *testing.T) {
	n := newNode(t, Config{Lookahead: 8, Concurrency: 3})
	n.putTrace(256*chunk, seq(0, 200)...)
	o := newOrigin(256, 0)
	dev, _ := n.open(o)
	defer dev.Close()
	if s := n.settle(); s.Prefetched != 8 {
		t.Fatalf("with the guest at the start, %d chunks prefetched, want the lookahead 8", s.Prefetched)
	}
	read(t, dev, 50) // the guest jumps to entry 50: entries 51..58 may follow
	s := n.settle()
	if s.Prefetched != 16 {
		t.Fatalf("%d chunks prefetched after the guest read entry 50, want 16", s.Prefetched)
	}
	for _, c := range o.got() {
		if c >= 8 && (c < 50 || c > 58) {
			t.Fatalf("chunk %d fetched outside the lookahead: %v", c, o.got())
		}
	}
	dev.Close()
	if s := n.pm.Stats("b"); s.WastedBytes != 16*chunk {
		t.Fatalf("wasted %d bytes, want %d (16 chunks never read)", s.WastedBytes, 16*chunk)
	}
}

// A guest read during a heavy replay over a slow, one-at-a-time origin
// waits for at most the replay's fills in flight, never for its queue.
func TestGuestFirst(t *testing.T) {
	const lat = 30 * time.Millisecond
	n := newNode(t, Config{Lookahead: 1000, Concurrency: 2})
	n.putTrace(512*chunk, seq(0, 400)...)
	o := newOrigin(512, lat)
	dev, _ := n.open(o)
	defer dev.Close()
	time.Sleep(5 * lat)
	var worst time.Duration
	for _, c := range []int64{450, 460, 470, 480, 490} { // not in the trace
		start := time.Now()
		read(t, dev, c)
		worst = max(worst, time.Since(start))
		time.Sleep(lat / 2)
	}
	s := n.pm.Stats("b")
	if !s.Replaying || s.Prefetched < 5 {
		t.Fatalf("the replay was not busy: %+v", s)
	}
	// Its own fetch plus the two fills in flight, and one more for the
	// lock's hand-over, with slack for a loaded host.
	if bound := 4*lat + 60*time.Millisecond; worst > bound {
		t.Fatalf("a guest read took %v during the replay, bound %v", worst, bound)
	}
	t.Logf("worst guest read %v (origin %v a read, one at a time); replay %+v", worst, lat, s)
}

// When the guest's reads are not the trace's, the replay stops early.
func TestBackOffOnWrongTrace(t *testing.T) {
	n := newNode(t, Config{Lookahead: 16, Concurrency: 2})
	n.putTrace(512*chunk, seq(0, 300)...)
	o := newOrigin(512, time.Millisecond)
	dev, _ := n.open(o)
	defer dev.Close()
	for c := int64(300); c < 300+backoffWindow; c++ {
		read(t, dev, c)
	}
	s := n.settle()
	if !s.BackedOff || s.Replaying {
		t.Fatalf("the replay did not back off: %+v", s)
	}
	if s.Prefetched > 16 {
		t.Fatalf("a wrong trace fetched %d chunks, more than the lookahead", s.Prefetched)
	}
	dev.Close()
	if s := n.pm.Stats("b"); s.WastedBytes != s.PrefetchedBytes {
		t.Fatalf("wasted %d of %d prefetched bytes: the guest read none", s.WastedBytes, s.PrefetchedBytes)
	}
}

// Chunks already in the cache are skipped, not fetched again.
func TestReplaySkipsPresent(t *testing.T) {
	n := newNode(t, Config{Concurrency: 2})
	o := newOrigin(64, 0)
	ref, err := n.cm.Open("b", bind, o, chunk)
	if err != nil {
		t.Fatal(err)
	}
	if err := ref.Prefetch(0, 10*chunk); err != nil {
		t.Fatal(err)
	}
	ref.Close()
	if err := Save(filepath.Join(n.dir, "b"), &Trace{ChunkSize: chunk, Size: 64 * chunk, Chunks: seq(0, 20), MS: make([]uint32, 20)}); err != nil {
		t.Fatal(err)
	}
	before := len(o.got())
	dev, _ := n.open(o)
	defer dev.Close()
	s := n.settle()
	if s.Skipped != 10 || s.Prefetched != 10 {
		t.Fatalf("skipped %d, prefetched %d: want 10 and 10", s.Skipped, s.Prefetched)
	}
	for _, c := range o.got()[before:] {
		if c < 10 {
			t.Fatalf("present chunk %d fetched again", c)
		}
	}
}

// A trace goes with its content: a cache emptied for another generation
// drops it; a new directory keeps an imported one.
func TestTraceFollowsIdentity(t *testing.T) {
	n := newNode(t, Config{})
	n.putTrace(64*chunk, 1, 2, 3)
	o := newOrigin(64, 0)
	ref, err := n.cm.Open("b", bind, o, chunk)
	if err != nil {
		t.Fatal(err)
	}
	ref.Close()
	if _, err := Load(filepath.Join(n.dir, "b")); err != nil {
		t.Fatalf("an imported trace was dropped at the base's first open: %v", err)
	}
	other := bind
	other.Generation = "2"
	ref, err = n.cm.Open("b", other, o, chunk)
	if err != nil {
		t.Fatal(err)
	}
	ref.Close()
	if _, err := Load(filepath.Join(n.dir, "b")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the trace outlived its content: %v", err)
	}
}

// StopRecording ends a recording before its window.
func TestStopRecording(t *testing.T) {
	n := newNode(t, Config{RecordWindow: time.Hour})
	dev, _ := n.open(newOrigin(16, 0))
	defer dev.Close()
	read(t, dev, 3)
	read(t, dev, 1)
	if err := n.pm.StopRecording("b"); err != nil {
		t.Fatal(err)
	}
	read(t, dev, 2)
	tr, err := Load(filepath.Join(n.dir, "b"))
	if err != nil || len(tr.Chunks) != 2 {
		t.Fatalf("trace %+v, %v: want chunks 3 and 1", tr, err)
	}
	if err := n.pm.StopRecording("b"); !errors.Is(err, ErrNoRecording) {
		t.Fatalf("a second stop: %v", err)
	}
}
