// Package metrics is a pass-through layer that counts what goes through an
// export: operations, bytes, latency per operation, errors by cause and
// requests in flight. It sits on top of an export's stack, so it sees what
// the guest asked for; where the bytes came from (cache, origin) is the
// cache layer's to say.
package metrics

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// Operation names, the "op" label.
const (
	OpRead        = "read"
	OpWrite       = "write"
	OpFlush       = "flush"
	OpTrim        = "trim"
	OpZero        = "write_zeroes"
	OpBlockStatus = "block_status"
	OpPrefetch    = "prefetch"
)

// Set holds the Prometheus series of every export wrapped with it. One Set
// per daemon, registered on its registry.
type Set struct {
	ops      *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	errs     *prometheus.CounterVec
	inflight *prometheus.GaugeVec
	latency  *prometheus.HistogramVec
}

// NewSet makes the series and registers them on reg (nil: not registered).
func NewSet(reg prometheus.Registerer) *Set {
	s := &Set{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmthunder_export_requests_total", Help: "Requests served by an export, by operation.",
		}, []string{"export", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmthunder_export_bytes_total", Help: "Bytes read or written by the guest through an export.",
		}, []string{"export", "op"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmthunder_export_errors_total", Help: "Failed requests, by operation and cause.",
		}, []string{"export", "op", "cause"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vmthunder_export_inflight_requests", Help: "Requests being served by an export.",
		}, []string{"export"}),
		// Per operation only: a histogram per export would multiply the
		// series by hundreds of VMs.
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmthunder_request_duration_seconds",
			Help:    "Latency of export requests, by operation.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 4, 10), // 50µs .. ~13s
		}, []string{"op"}),
	}
	if reg != nil {
		reg.MustRegister(s.ops, s.bytes, s.errs, s.inflight, s.latency)
	}
	return s
}

// Forget drops an export's series after it is removed.
func (s *Set) Forget(export string) {
	lbl := prometheus.Labels{"export": export}
	s.ops.DeletePartialMatch(lbl)
	s.bytes.DeletePartialMatch(lbl)
	s.errs.DeletePartialMatch(lbl)
	s.inflight.DeletePartialMatch(lbl)
}

// Counters are one export's totals, for the JSON API.
type Counters struct {
	ReadOps, WriteOps     uint64
	ReadBytes, WriteBytes uint64
	Errors                uint64
	InFlight              int64
}

// Dev counts requests to the device below. Close closes the device below:
// the layer owns it.
type Dev struct {
	next  blockdev.Device
	async blockdev.AsyncReader // next's asynchronous read path, or nil
	set   *Set
	name  string

	readOps, writeOps, readBytes, writeBytes, errors atomic.Uint64
	inflight                                         atomic.Int64
	gInflight                                        prometheus.Gauge
	// The read series, looked up once: reads are most requests, and a
	// label lookup per request costs more than the counting.
	rOps, rBytes prometheus.Counter
	rLatency     prometheus.Observer
}

// Wrap puts the counting layer over dev for the export named name. set may
// be nil (counters only, no Prometheus series).
func Wrap(dev blockdev.Device, set *Set, name string) *Dev {
	d := &Dev{next: dev, async: blockdev.AsyncOf(dev), set: set, name: name}
	if set != nil {
		d.gInflight = set.inflight.WithLabelValues(name)
		d.rOps = set.ops.WithLabelValues(name, OpRead)
		d.rBytes = set.bytes.WithLabelValues(name, OpRead)
		d.rLatency = set.latency.WithLabelValues(OpRead)
	}
	return d
}

// Unwrap returns the counted asynchronous read path when the device below
// has one (blockdev.AsyncOf), nil otherwise. Dev is not a pure wrapper, so
// it never hands out the device below: the path it returns is Dev itself
// with ReadAtAsync, which counts a read as ReadAt does.
func (d *Dev) Unwrap() blockdev.Device {
	if d.async == nil {
		return nil
	}
	return countedAsync{d}
}

// countedAsync is a Dev seen through its asynchronous read path.
type countedAsync struct{ *Dev }

func (a countedAsync) ReadAtAsync(p []byte, off int64, done func(error)) {
	d := a.Dev
	t := d.begin()
	d.async.ReadAtAsync(p, off, func(err error) {
		n := len(p)
		if err != nil {
			n = 0
		}
		d.endRead(t, n, err)
		done(err)
	})
}

func (a countedAsync) Unplug() { a.async.Unplug() }

// Counters returns the export's totals.
func (d *Dev) Counters() Counters {
	return Counters{ReadOps: d.readOps.Load(), WriteOps: d.writeOps.Load(),
		ReadBytes: d.readBytes.Load(), WriteBytes: d.writeBytes.Load(),
		Errors: d.errors.Load(), InFlight: d.inflight.Load()}
}

func (d *Dev) begin() time.Time {
	d.inflight.Add(1)
	if d.gInflight != nil {
		d.gInflight.Inc()
	}
	return time.Now()
}

func (d *Dev) end(op string, start time.Time, n int64, err error) {
	d.inflight.Add(-1)
	if err != nil {
		d.errors.Add(1)
	}
	if d.set == nil {
		return
	}
	d.gInflight.Dec()
	d.set.ops.WithLabelValues(d.name, op).Inc()
	if n > 0 {
		d.set.bytes.WithLabelValues(d.name, op).Add(float64(n))
	}
	d.set.latency.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil {
		d.set.errs.WithLabelValues(d.name, op, Cause(err)).Inc()
	}
}

// Cause names an error's kind for the "cause" label: a small fixed set, so
// error text never becomes a label value.
func Cause(err error) string {
	switch {
	case errors.Is(err, blockdev.ErrOutOfRange):
		return "out_of_range"
	case errors.Is(err, blockdev.ErrReadOnly):
		return "read_only"
	case errors.Is(err, blockdev.ErrUnsupported):
		return "unsupported"
	case errors.Is(err, blockdev.ErrNoSpace), errors.Is(err, syscall.ENOSPC):
		return "no_space"
	case errors.Is(err, blockdev.ErrShortIO):
		return "short_io"
	case errors.Is(err, blockdev.ErrInvalid):
		return "invalid"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled), errors.Is(err, os.ErrClosed):
		return "canceled"
	}
	return "io"
}

func (d *Dev) ReadAt(p []byte, off int64) (int, error) {
	t := d.begin()
	n, err := d.next.ReadAt(p, off)
	d.endRead(t, n, err)
	return n, err
}

// endRead is end for a read, with the read series looked up at Wrap.
func (d *Dev) endRead(start time.Time, n int, err error) {
	d.readOps.Add(1)
	d.readBytes.Add(uint64(n))
	d.inflight.Add(-1)
	if err != nil {
		d.errors.Add(1)
	}
	if d.set == nil {
		return
	}
	d.gInflight.Dec()
	d.rOps.Inc()
	if n > 0 {
		d.rBytes.Add(float64(n))
	}
	d.rLatency.Observe(time.Since(start).Seconds())
	if err != nil {
		d.set.errs.WithLabelValues(d.name, OpRead, Cause(err)).Inc()
	}
}

func (d *Dev) WriteAt(p []byte, off int64) (int, error) {
	t := d.begin()
	n, err := d.next.WriteAt(p, off)
	d.writeOps.Add(1)
	d.writeBytes.Add(uint64(n))
	d.end(OpWrite, t, int64(n), err)
	return n, err
}

func (d *Dev) Flush() error {
	t := d.begin()
	err := d.next.Flush()
	d.end(OpFlush, t, 0, err)
	return err
}

func (d *Dev) Trim(off, length int64) error {
	t := d.begin()
	err := d.next.Trim(off, length)
	d.end(OpTrim, t, 0, err)
	return err
}

func (d *Dev) WriteZeroes(off, length int64) error {
	t := d.begin()
	err := d.next.WriteZeroes(off, length)
	d.end(OpZero, t, 0, err)
	return err
}

func (d *Dev) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	t := d.begin()
	ex, err := d.next.BlockStatus(off, length)
	d.end(OpBlockStatus, t, 0, err)
	return ex, err
}

func (d *Dev) Prefetch(off, length int64) error {
	t := d.begin()
	err := d.next.Prefetch(off, length)
	d.end(OpPrefetch, t, 0, err)
	return err
}

func (d *Dev) Size() int64         { return d.next.Size() }
func (d *Dev) Caps() blockdev.Caps { return d.next.Caps() }
func (d *Dev) Close() error        { return d.next.Close() }
