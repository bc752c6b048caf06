package metrics

import (
	"errors"
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

func gather(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// value finds the sample of family name whose labels include want.
func value(t *testing.T, mfs map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	mf := mfs[name]
	if mf == nil {
		t.Fatalf("no family %s", name)
	}
next:
	for _, m := range mf.Metric {
		got := map[string]string{}
		for _, l := range m.Label {
			got[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if got[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("no sample of %s with %v", name, want)
	return 0
}

func TestCounts(t *testing.T) {
	reg := prometheus.NewRegistry()
	set := NewSet(reg)
	d := Wrap(memdev.New(1<<20), set, "vm1")
	buf := make([]byte, 4096)
	for i := 0; i < 3; i++ {
		if _, err := d.ReadAt(buf, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.WriteAt(buf[:512], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(buf, 1<<20); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	c := d.Counters()
	if c.ReadOps != 4 || c.ReadBytes != 3*4096 || c.WriteOps != 1 || c.WriteBytes != 512 || c.Errors != 1 || c.InFlight != 0 {
		t.Errorf("counters %+v", c)
	}
	mfs := gather(t, reg)
	for _, tc := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"vmthunder_export_requests_total", map[string]string{"export": "vm1", "op": "read"}, 4},
		{"vmthunder_export_requests_total", map[string]string{"export": "vm1", "op": "flush"}, 1},
		{"vmthunder_export_bytes_total", map[string]string{"export": "vm1", "op": "read"}, 3 * 4096},
		{"vmthunder_export_bytes_total", map[string]string{"export": "vm1", "op": "write"}, 512},
		{"vmthunder_export_errors_total", map[string]string{"export": "vm1", "op": "read", "cause": "out_of_range"}, 1},
		{"vmthunder_export_inflight_requests", map[string]string{"export": "vm1"}, 0},
		{"vmthunder_request_duration_seconds", map[string]string{"op": "read"}, 4},
	} {
		if got := value(t, mfs, tc.name, tc.labels); got != tc.want {
			t.Errorf("%s%v = %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
	set.Forget("vm1")
	if mf := gather(t, reg)["vmthunder_export_requests_total"]; mf != nil && len(mf.Metric) > 0 {
		t.Errorf("series left after Forget: %v", mf.Metric)
	}
}

// blocker holds reads until released, to observe in-flight requests.
type blocker struct {
	blockdev.Device
	entered, release chan struct{}
}

func (b blocker) ReadAt(p []byte, off int64) (int, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Device.ReadAt(p, off)
}

func TestInFlight(t *testing.T) {
	reg := prometheus.NewRegistry()
	b := blocker{memdev.New(4096), make(chan struct{}), make(chan struct{})}
	d := Wrap(b, NewSet(reg), "x")
	done := make(chan error)
	for i := 0; i < 2; i++ {
		go func() { _, err := d.ReadAt(make([]byte, 10), 0); done <- err }()
		<-b.entered
	}
	if n := d.Counters().InFlight; n != 2 {
		t.Errorf("in flight = %d, want 2", n)
	}
	if v := value(t, gather(t, reg), "vmthunder_export_inflight_requests", map[string]string{"export": "x"}); v != 2 {
		t.Errorf("gauge = %v, want 2", v)
	}
	close(b.release)
	for i := 0; i < 2; i++ {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if n := d.Counters().InFlight; n != 0 {
		t.Errorf("in flight after = %d", n)
	}
}

func TestCause(t *testing.T) {
	for err, want := range map[error]string{
		fmt.Errorf("x: %w", blockdev.ErrReadOnly):    "read_only",
		fmt.Errorf("x: %w", blockdev.ErrNoSpace):     "no_space",
		fmt.Errorf("x: %w", blockdev.ErrShortIO):     "short_io",
		fmt.Errorf("x: %w", blockdev.ErrUnsupported): "unsupported",
		errors.New("target went away"):               "io",
	} {
		if got := Cause(err); got != want {
			t.Errorf("Cause(%v) = %s, want %s", err, got, want)
		}
	}
}

// asyncDev is a device with an asynchronous read path, like the iSCSI
// origin.
type asyncDev struct{ blockdev.Device }

func (a asyncDev) ReadAtAsync(p []byte, off int64, done func(error)) {
	_, err := a.ReadAt(p, off)
	done(err)
}
func (a asyncDev) Unplug() {}

// The NBD server reads through blockdev.AsyncOf when it finds a path; a
// read taken there must not skip the counters.
func TestAsyncReadsAreCounted(t *testing.T) {
	d := Wrap(asyncDev{memdev.New(4096)}, nil, "x")
	if a := blockdev.AsyncOf(d); a != nil {
		a.ReadAtAsync(make([]byte, 512), 0, func(error) {})
	} else if _, err := d.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if c := d.Counters(); c.ReadOps != 1 || c.ReadBytes != 512 {
		t.Fatalf("a read the server sent was not counted: %+v", c)
	}
}

// Over a device without an asynchronous path the NBD server keeps its
// workers (blockdev.AsyncOf finds nothing); over one with it, the series
// count reads taken there as ReadAt's, errors included.
func TestAsyncPath(t *testing.T) {
	if a := blockdev.AsyncOf(Wrap(memdev.New(4096), nil, "x")); a != nil {
		t.Fatalf("asynchronous path %T over a synchronous device", a)
	}
	reg := prometheus.NewRegistry()
	d := Wrap(asyncDev{memdev.New(8192)}, NewSet(reg), "vm1")
	a := blockdev.AsyncOf(d)
	if a == nil {
		t.Fatal("no asynchronous path over a device that has one")
	}
	var errs []error
	for _, off := range []int64{0, 4096, 8192} {
		a.ReadAtAsync(make([]byte, 4096), off, func(err error) { errs = append(errs, err) })
	}
	a.Unplug()
	if len(errs) != 3 || errs[0] != nil || errs[1] != nil || !errors.Is(errs[2], blockdev.ErrOutOfRange) {
		t.Fatalf("errors %v", errs)
	}
	if c := d.Counters(); c.ReadOps != 3 || c.ReadBytes != 8192 || c.Errors != 1 || c.InFlight != 0 {
		t.Fatalf("counters %+v", c)
	}
	mfs := gather(t, reg)
	for _, tc := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"vmthunder_export_requests_total", map[string]string{"export": "vm1", "op": "read"}, 3},
		{"vmthunder_export_bytes_total", map[string]string{"export": "vm1", "op": "read"}, 8192},
		{"vmthunder_export_errors_total", map[string]string{"export": "vm1", "op": "read", "cause": "out_of_range"}, 1},
		{"vmthunder_export_inflight_requests", map[string]string{"export": "vm1"}, 0},
		{"vmthunder_request_duration_seconds", map[string]string{"op": "read"}, 3},
	} {
		if got := value(t, mfs, tc.name, tc.labels); got != tc.want {
			t.Errorf("%s%v = %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
}
