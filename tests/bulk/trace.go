// Package bulk is the many-node boot harness of issue 14: simulated
// compute nodes, each in its own network namespace with its own
// `vmthunder daemon`, joined by capped veth links to a bridge, with tgtd
// (the iSCSI origin) in a namespace of its own. A node "boots" by
// replaying a recorded block-read trace of the test guest's boot against
// its NBD export (or straight against the target, the baseline), and a
// few nodes boot the real guest through libvirt. The fault tests of this
// package and the bench (cmd/bulkbench, make bench-bulk) share it.
package bulk

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"
)

// Trace is the block reads of one guest boot, with what is needed to
// replay them the way the guest issued them: each read waits for the read
// that last completed before the guest issued it (After, -1 for none:
// the boot's start), then for the guest's think time (Gap).
type Trace struct {
	Version     int    `json:"version"`
	Note        string `json:"note"`
	ImageSize   int64  `json:"image_size"`
	ImageSHA256 string `json:"image_sha256"` // of the guest image the trace was recorded from
	Reads       []Read `json:"reads"`
}

// Read is one read request of the guest.
type Read struct {
	Off   int64 `json:"off"`
	Len   int64 `json:"len"`
	After int   `json:"after"`  // index of the read it waits for, -1: none
	GapUS int64 `json:"gap_us"` // think time after that read completed
}

// Limits on a trace file: it is test data, but a replay allocates from it.
const (
	maxTraceReads = 1 << 20
	maxReadLen    = 32 << 20
)

// LoadTrace reads a trace file (gzip-compressed JSON when it ends in .gz).
func LoadTrace(path string) (*Trace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var r io.Reader = f
	if len(path) > 3 && path[len(path)-3:] == ".gz" {
		z, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		r = z
	}
	var t Trace
	if err := json.NewDecoder(io.LimitReader(r, 256<<20)).Decode(&t); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &t, t.check()
}

func (t *Trace) check() error {
	if t.Version != 1 {
		return fmt.Errorf("trace version %d, want 1", t.Version)
	}
	if len(t.Reads) == 0 || len(t.Reads) > maxTraceReads {
		return fmt.Errorf("trace has %d reads", len(t.Reads))
	}
	for i, r := range t.Reads {
		if r.Len <= 0 || r.Len > maxReadLen || r.Off < 0 || r.Off+r.Len > t.ImageSize || r.After >= i || r.After < -1 || r.GapUS < 0 {
			return fmt.Errorf("trace read %d out of bounds: %+v (image %d bytes)", i, r, t.ImageSize)
		}
	}
	return nil
}

// Save writes the trace, gzip-compressed when path ends in .gz.
func (t *Trace) Save(path string) error {
	var buf bytes.Buffer
	var w io.Writer = &buf
	var z *gzip.Writer
	if len(path) > 3 && path[len(path)-3:] == ".gz" {
		z = gzip.NewWriter(&buf)
		w = z
	}
	enc := json.NewEncoder(w)
	if err := enc.Encode(t); err != nil {
		return err
	}
	if z != nil {
		if err := z.Close(); err != nil {
			return err
		}
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// Bytes is what the trace reads, counting overlaps once per read.
func (t *Trace) Bytes() int64 {
	var n int64
	for _, r := range t.Reads {
		n += r.Len
	}
	return n
}

// Think is the sum of the think-time gaps along the trace's longest
// chain of waits: the boot time of a replay on an infinitely fast disk.
func (t *Trace) Think() time.Duration {
	end := make([]int64, len(t.Reads))
	var longest int64
	for i, r := range t.Reads {
		var at int64
		if r.After >= 0 {
			at = end[r.After]
		}
		end[i] = at + r.GapUS
		longest = max(longest, end[i])
	}
	return time.Duration(longest) * time.Microsecond
}

// Short is the trace's first n reads with every gap scaled by think
// (0.1: a tenth of the recorded think time), for quick tests.
func (t *Trace) Short(n int, think float64) *Trace {
	s := *t
	if n > 0 && n < len(t.Reads) {
		s.Reads = t.Reads[:n]
	}
	s.Reads = append([]Read(nil), s.Reads...)
	for i := range s.Reads {
		s.Reads[i].GapUS = int64(float64(s.Reads[i].GapUS) * think)
	}
	return &s
}

// Disk is what a trace replays against.
type Disk interface {
	ReadAt(p []byte, off int64) (int, error)
}

// ReplayOptions tune a replay.
type ReplayOptions struct {
	// Verify, when set, is the origin's content: every read is compared
	// with it, and a difference counted in Result.Mismatched.
	Verify io.ReaderAt
	// ReadTimeout fails a read that takes longer (0: 2 minutes).
	ReadTimeout time.Duration
	// Progress, when set, is called with the number of reads completed
	// so far after each one completes.
	Progress func(done int)
}

// Result is what one replayed boot showed.
type Result struct {
	Boot       time.Duration `json:"-"`
	BootMS     float64       `json:"boot_ms"`
	Reads      int           `json:"reads"`
	Bytes      int64         `json:"bytes"`
	Failed     int           `json:"failed"`
	Mismatched int           `json:"mismatched"`
	FirstError string        `json:"first_error,omitempty"`
}

// Replay issues the trace's reads against d as the guest did and returns
// when every read has completed or failed.
func Replay(t *Trace, d Disk, o ReplayOptions) *Result {
	if o.ReadTimeout == 0 {
		o.ReadTimeout = 2 * time.Minute
	}
	n := len(t.Reads)
	done := make([]chan struct{}, n)
	for i := range done {
		done[i] = make(chan struct{})
	}
	type outcome struct {
		err      error
		mismatch bool
	}
	out := make([]outcome, n)
	var completed atomic.Int64
	start := time.Now()
	sem := make(chan struct{}, 256) // bounds goroutines blocked on the disk, not the trace's concurrency
	for i, r := range t.Reads {
		var wait chan struct{}
		if r.After >= 0 {
			wait = done[r.After]
		}
		go func(i int, r Read) {
			defer close(done[i])
			if wait != nil {
				<-wait
			}
			if r.GapUS > 0 {
				time.Sleep(time.Duration(r.GapUS) * time.Microsecond)
			}
			sem <- struct{}{}
			defer func() { <-sem }()
			buf := make([]byte, r.Len)
			err := readWithin(d, buf, r.Off, o.ReadTimeout)
			out[i].err = err
			if o.Progress != nil {
				o.Progress(int(completed.Add(1)))
			}
			if err == nil && o.Verify != nil {
				want := make([]byte, r.Len)
				if _, err := o.Verify.ReadAt(want, r.Off); err != nil && !errors.Is(err, io.EOF) {
					out[i].err = fmt.Errorf("reading the origin's bytes to compare: %w", err)
				} else if !bytes.Equal(buf, want) {
					out[i].mismatch = true
				}
			}
		}(i, r)
	}
	for i := range done {
		<-done[i]
	}
	res := &Result{Boot: time.Since(start), Reads: n}
	res.BootMS = float64(res.Boot.Microseconds()) / 1000
	for i, oc := range out {
		switch {
		case oc.err != nil:
			res.Failed++
			if res.FirstError == "" {
				res.FirstError = fmt.Sprintf("read %d (%d bytes at %d): %v", i, t.Reads[i].Len, t.Reads[i].Off, oc.err)
			}
		case oc.mismatch:
			res.Mismatched++
			if res.FirstError == "" {
				res.FirstError = fmt.Sprintf("read %d (%d bytes at %d): not the origin's bytes", i, t.Reads[i].Len, t.Reads[i].Off)
			}
		default:
			res.Bytes += t.Reads[i].Len
		}
	}
	return res
}

func readWithin(d Disk, buf []byte, off int64, timeout time.Duration) error {
	errc := make(chan error, 1)
	go func() {
		n, err := d.ReadAt(buf, off)
		if err == nil && n < len(buf) {
			err = io.ErrUnexpectedEOF
		}
		errc <- err
	}()
	select {
	case err := <-errc:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("no answer within %v", timeout)
	}
}
