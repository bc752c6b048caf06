package peers

import (
	"errors"
	"fmt"
	"math"
	"testing"
	"time"
)

// The histogram is cumulative per bound, as Prometheus reads it, with
// what is above the last bound only in the count; per-member counters go
// when Retain drops the member.
func TestTraffic(t *testing.T) {
	tr := NewTraffic()
	for _, d := range []time.Duration{100 * time.Microsecond, 500 * time.Microsecond, 3 * time.Millisecond, 2 * time.Second, 10 * time.Second} {
		tr.observe(OutcomeOK, d)
	}
	tr.observe(OutcomeTimeout, 2*time.Second)
	tr.observe("no such outcome", time.Second) // ignored
	f := tr.Fetches()
	ok := f[OutcomeOK]
	if ok.Count != 5 || math.Abs(ok.Sum-12.0036) > 1e-9 {
		t.Fatalf("ok: count %d sum %v", ok.Count, ok.Sum)
	}
	for bound, want := range map[float64]uint64{0.0005: 2, 0.001: 2, 0.0025: 2, 0.005: 3, 1: 3, 2.5: 4, 5: 4} {
		if ok.Buckets[bound] != want {
			t.Errorf("bucket le=%v: %d, want %d", bound, ok.Buckets[bound], want)
		}
	}
	if f[OutcomeTimeout].Count != 1 || f[OutcomeError].Count != 0 || f[OutcomeCorrupt].Count != 0 || len(f) != len(Outcomes) {
		t.Fatalf("outcomes: %+v", f)
	}

	for i := range 3 {
		tr.received(fmt.Sprintf("m%d", i), 100)
		tr.served(fmt.Sprintf("m%d", i), 10*(i+1))
	}
	tr.Retain(func(name string) bool { return name != "m1" })
	got := tr.Members()
	if len(got) != 2 || got["m0"] != (MemberBytes{100, 10}) || got["m2"] != (MemberBytes{100, 30}) {
		t.Fatalf("members after Retain: %+v", got)
	}
	var none *Traffic // a source or server without counters
	none.received("m0", 1)
	none.served("m0", 1)
	none.observe(OutcomeOK, time.Second)
}

// A fetch that found no answer in time is a timeout; any other failure an
// error.
func TestFetchOutcome(t *testing.T) {
	timeout := &FetchError{Peer: "p", Unavailable: true, Err: fmt.Errorf("get: %w", errDeadline{})}
	if o := fetchOutcome(timeout); o != OutcomeTimeout {
		t.Errorf("deadline: %s", o)
	}
	if o := fetchOutcome(&FetchError{Peer: "p", Status: 503, Err: errors.New("busy")}); o != OutcomeError {
		t.Errorf("503: %s", o)
	}
}

// errDeadline is what net/http returns when a request's context expires
// mid-read: a net.Error whose Timeout is true.
type errDeadline struct{}

func (errDeadline) Error() string   { return "deadline exceeded" }
func (errDeadline) Timeout() bool   { return true }
func (errDeadline) Temporary() bool { return true }
