package stack

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// A model-based torture test: workers issue random reads, writes, flushes,
// trims and write-zeroes at once against a stack and the same operations
// against an in-memory reference, and every read must match the model.
//
// To keep the model exact under concurrency, each worker owns small
// interleaved slots (1.5 KiB, so several workers share every 4 KiB cluster
// and every cache chunk, which is where the locking matters) and only
// touches its own; now and then one worker takes the whole device for a
// large operation across slots, and a checker compares the whole device.

const (
	tortureSize = 3<<20 + 5000 // not a multiple of chunk or cluster
	slot        = 1536
	workers     = 6
	chunk       = 16 << 10
)

type originCounter struct {
	blockdev.Device
	closed *atomic.Int32
}

func (o originCounter) Close() error { o.closed.Add(1); return nil }

type tortureCase struct {
	name     string
	mode     Mode
	cache    bool
	writable bool
}

func TestTorture(t *testing.T) {
	for _, tc := range []tortureCase{
		{"cache+readonly", ModeReadOnly, true, false},
		{"cache+cow", ModeCOW, true, true},
		{"cache+write-through", ModeWriteThrough, true, true},
		{"cow-without-cache", ModeCOW, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) { torture(t, tc, 2*time.Second) })
	}
}

func torture(t *testing.T, tc tortureCase, dur time.Duration) {
	dir := t.TempDir()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	orig := make([]byte, tortureSize)
	for i := range orig {
		orig[i] = byte(rng.Uint32())
	}
	pristine := bytes.Clone(orig)
	model := memdev.FromBytes(bytes.Clone(orig), false)
	var closed atomic.Int32
	opts := Options{Origin: origin.Spec{URL: "mem"}, Mode: tc.mode, ChunkSize: chunk,
		OpenOrigin: func(s origin.Spec) (blockdev.Device, error) {
			return originCounter{memdev.FromBytes(orig, s.ReadOnly), &closed}, nil
		}}
	if tc.cache {
		opts.CacheDir = filepath.Join(dir, "cache")
		if tc.mode != ModeWriteThrough {
			// Content that never changes: a template, whose cache is kept.
			opts.Template, opts.Generation = "base", "1"
		}
	}
	if tc.mode == ModeCOW {
		opts.CowPath = filepath.Join(dir, "vm.cow")
	}
	dev, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}

	var world sync.RWMutex // workers RLock per op; big ops and checks Lock
	var ops atomic.Int64
	stop := time.Now().Add(dur)
	var wg sync.WaitGroup
	errc := make(chan error, workers+1)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)+2))
			for time.Now().Before(stop) {
				var err error
				if r.IntN(200) == 0 {
					world.Lock()
					err = bigOp(r, dev, model, tc.writable)
					if err == nil && r.IntN(3) == 0 {
						err = checkAll(dev, model, r)
					}
					world.Unlock()
				} else {
					world.RLock()
					err = slotOp(r, w, dev, model, tc.writable)
					world.RUnlock()
				}
				if err != nil {
					errc <- fmt.Errorf("worker %d: %w", w, err)
					return
				}
				ops.Add(1)
			}
		}(w)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if err := checkAll(dev, model, rng); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(); tc.writable && err != nil {
		t.Fatal(err)
	}
	t.Logf("%d ops", ops.Load())
	if ops.Load() < 1000 {
		t.Fatalf("only %d ops ran", ops.Load())
	}
	if c := dev.Cache(); c != nil {
		st := c.Stats()
		t.Logf("cache stats %+v", st)
		if st.Hits == 0 || st.Fills == 0 {
			t.Fatalf("cache was not exercised: %+v", st)
		}
	}
	switch tc.mode {
	case ModeWriteThrough:
		if !bytes.Equal(orig, model.Bytes()) {
			t.Fatal("origin differs from the model after write-through")
		}
	default:
		if !bytes.Equal(orig, pristine) {
			t.Fatal("the origin was written, but this mode must never write it")
		}
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	if closed.Load() != 1 {
		t.Fatalf("origin closed %d times, want 1", closed.Load())
	}
	// Reopen: a template's cache and the cow store resume and still
	// match; a volume's cache (write-through) starts empty.
	dev, err = Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if c := dev.Cache(); c != nil {
		kept := c.Stats().ChunksPresent > 0
		if want := opts.Template != ""; kept != want {
			t.Fatalf("cache kept across close: %v, want %v", kept, want)
		}
	}
	if err := checkAll(dev, model, rng); err != nil {
		t.Fatalf("after reopen: %v", err)
	}
}

func randRange(r *rand.Rand, lo, hi int64) (int64, int64) {
	off := lo + r.Int64N(hi-lo)
	return off, 1 + r.Int64N(hi-off)
}

// slotOp is one operation inside worker w's own slot.
func slotOp(r *rand.Rand, w int, dev, model blockdev.Device, writable bool) error {
	nslots := int64(tortureSize / slot)
	s := int64(w) + int64(workers)*r.Int64N(nslots/workers)
	off, n := randRange(r, s*slot, (s+1)*slot)
	return doOp(r, dev, model, writable, off, n)
}

// bigOp is one operation anywhere, up to 300 KiB, with the world stopped.
func bigOp(r *rand.Rand, dev, model blockdev.Device, writable bool) error {
	off := r.Int64N(tortureSize)
	n := 1 + r.Int64N(min(300<<10, tortureSize-off))
	return doOp(r, dev, model, writable, off, n)
}

func doOp(r *rand.Rand, dev, model blockdev.Device, writable bool, off, n int64) error {
	switch k := r.IntN(100); {
	case k < 45:
		got := make([]byte, n)
		if _, err := dev.ReadAt(got, off); err != nil {
			return fmt.Errorf("read %d+%d: %w", off, n, err)
		}
		want := make([]byte, n)
		model.ReadAt(want, off)
		if i := firstDiff(got, want); i >= 0 {
			return fmt.Errorf("read %d+%d: byte %d is %#x, model %#x", off, n, off+int64(i), got[i], want[i])
		}
	case k < 80:
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(r.Uint32())
		}
		_, err := dev.WriteAt(p, off)
		if !writable {
			if !errors.Is(err, blockdev.ErrReadOnly) {
				return fmt.Errorf("write on a read-only stack: %v, want ErrReadOnly", err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("write %d+%d: %w", off, n, err)
		}
		model.WriteAt(p, off)
	case k < 87:
		if err := dev.Flush(); err != nil && writable {
			return fmt.Errorf("flush: %w", err)
		}
	case k < 93:
		err := dev.Trim(off, n)
		if !writable {
			return nil
		}
		if err != nil {
			return fmt.Errorf("trim %d+%d: %w", off, n, err)
		}
		model.Trim(off, n) // the model zeroes; so must every writable stack here
	default:
		err := dev.WriteZeroes(off, n)
		if !writable {
			if !errors.Is(err, blockdev.ErrReadOnly) {
				return fmt.Errorf("write-zeroes on a read-only stack: %v", err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("write-zeroes %d+%d: %w", off, n, err)
		}
		model.WriteZeroes(off, n)
	}
	return nil
}

// checkAll reads the whole device in random-sized pieces.
func checkAll(dev, model blockdev.Device, r *rand.Rand) error {
	want := make([]byte, tortureSize)
	model.ReadAt(want, 0)
	got := make([]byte, tortureSize)
	for off := int64(0); off < tortureSize; {
		n := min(1+r.Int64N(1<<20), tortureSize-off)
		if _, err := dev.ReadAt(got[off:off+n], off); err != nil {
			return fmt.Errorf("check read %d+%d: %w", off, n, err)
		}
		off += n
	}
	if i := firstDiff(got, want); i >= 0 {
		return fmt.Errorf("check: byte %d is %#x, model %#x", i, got[i], want[i])
	}
	return nil
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// The manager shares one base between stacks and closes the origin once.
func TestSharedBase(t *testing.T) {
	dir := t.TempDir()
	m, err := cache.NewManager(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	var opened, closed atomic.Int32
	opts := Options{Origin: origin.Spec{URL: "mem"}, Manager: m, Template: "tmpl", Generation: "1", Mode: ModeCOW,
		OpenOrigin: func(s origin.Spec) (blockdev.Device, error) {
			opened.Add(1)
			return originCounter{memdev.FromBytes(data, s.ReadOnly), &closed}, nil
		}}
	var devs []*Export
	for i := 0; i < 3; i++ {
		o := opts
		o.CowPath = filepath.Join(dir, fmt.Sprintf("vm%d.cow", i))
		d, err := Build(o)
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, d)
	}
	if opened.Load() != 1 {
		t.Fatalf("origin opened %d times for 3 exports of one base, want 1", opened.Load())
	}
	if devs[0].Cache().Base != devs[2].Cache().Base {
		t.Fatal("exports of one base got different caches")
	}
	buf := make([]byte, 4096)
	devs[0].WriteAt([]byte("vm0"), 0)
	for i, d := range devs {
		if _, err := d.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		if (i == 0) != bytes.Equal(buf[:3], []byte("vm0")) {
			t.Fatalf("export %d sees %q: a VM's write leaked or was lost", i, buf[:3])
		}
	}
	if st := devs[1].Cache().Stats(); st.Fills != 1 || st.Hits != 2 {
		t.Fatalf("want 1 fill and 2 hits for three reads of one chunk, got %+v", st)
	}
	for i, d := range devs {
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if want := int32(0); i == 2 {
			want = 1
			if closed.Load() != want {
				t.Fatalf("origin closed %d times after the last export, want 1", closed.Load())
			}
		} else if closed.Load() != want {
			t.Fatalf("origin closed while export %d is still open", i+1)
		}
	}
}

func TestBuildErrors(t *testing.T) {
	mem := func(s origin.Spec) (blockdev.Device, error) { return memdev.New(1 << 20), nil }
	dir := t.TempDir()
	for _, c := range []struct {
		o    Options
		want string
	}{
		{Options{Mode: ModeCOW}, "needs a store path"},
		{Options{Mode: ModeDirect, CacheDir: dir}, "direct has no cache"},
		{Options{Mode: "bogus"}, "unknown mode"},
		{Options{Mode: ModeReadOnly, CowPath: "x"}, "cow store is given"},
		{Options{Mode: ModeReadOnly, CacheDir: dir, Template: "../x", Generation: "1"}, "base id"},
		{Options{Mode: ModeWriteThrough, CacheDir: dir, Template: "t", Generation: "1"}, "read-only content"},
		{Options{Mode: ModeReadOnly, CacheDir: dir, Template: "t"}, "needs its content generation"},
		{Options{Mode: ModeReadOnly, CacheDir: dir, Generation: "1"}, "without a template"},
		{Options{Mode: ModeReadOnly, CacheDir: dir, ChunkSize: 1000}, "chunk size"},
	} {
		c.o.Origin.URL = "/x/y"
		c.o.OpenOrigin = mem
		d, err := Build(c.o)
		if err == nil {
			d.Close()
			t.Errorf("%+v: no error", c.o)
			continue
		}
		if !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
			t.Errorf("%+v: error %q does not say %q", c.o, err, c.want)
		}
	}
}

// Two exports of one base by CacheDir alone share the cache in-process.
func TestCacheDirShared(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 1<<20)
	o := Options{Origin: origin.Spec{URL: "mem"}, CacheDir: dir, Template: "b", Generation: "1",
		OpenOrigin: func(s origin.Spec) (blockdev.Device, error) { return memdev.FromBytes(data, s.ReadOnly), nil }}
	a, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Build(o)
	if err != nil {
		t.Fatalf("second export of one base by CacheDir: %v", err)
	}
	defer b.Close()
	if a.Cache().Base != b.Cache().Base {
		t.Fatal("not shared")
	}
}
