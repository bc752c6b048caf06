package peers

import (
	"fmt"
	"math"
	"slices"
	"testing"
)

func names(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("compute-%02d", i)
	}
	return out
}

func homes(members []string, base string, chunks int) []string {
	out := make([]string, chunks)
	for c := range out {
		out[c] = Home(members, base, int64(c))
	}
	return out
}

// A member joining takes about 1/N of the chunks, and only chunks move to
// it; a member leaving gives away exactly its own chunks.
func TestRendezvousStability(t *testing.T) {
	const chunks = 20000
	base := "cirros.g0123456789ab"
	for _, n := range []int{3, 8, 32} {
		all := names(n + 1)
		before := homes(all[:n], base, chunks)
		after := homes(all, base, chunks)
		joined := all[n]
		moved := 0
		for c := range chunks {
			if before[c] != after[c] {
				moved++
				if after[c] != joined {
					t.Fatalf("n=%d: chunk %d moved from %s to %s, not to the new member", n, c, before[c], after[c])
				}
			}
		}
		want := float64(chunks) / float64(n+1)
		t.Logf("n=%d -> %d (a join): %.4f of the chunks moved, all to the new member (ideal 1/%d = %.4f)", n, n+1, float64(moved)/chunks, n+1, 1/float64(n+1))
		if math.Abs(float64(moved)-want) > 0.15*want {
			t.Errorf("n=%d -> %d: %d chunks moved, want about %.0f (1/%d)", n, n+1, moved, want, n+1)
		}

		// The member that joined leaves again: back to before, exactly.
		if got := homes(all[:n], base, chunks); !slices.Equal(got, before) {
			t.Fatalf("n=%d: homes after leave differ from before the join", n)
		}
		// Another member leaves: only its chunks move.
		gone := all[n/2]
		rest := slices.Delete(slices.Clone(all), n/2, n/2+1)
		left := homes(rest, base, chunks)
		moved = 0
		for c := range chunks {
			if after[c] != left[c] {
				moved++
				if after[c] != gone {
					t.Fatalf("n=%d: chunk %d of %s moved when %s left", n, c, after[c], gone)
				}
			}
		}
		want = float64(chunks) / float64(n+1)
		t.Logf("n=%d -> %d (a leave): %.4f of the chunks moved, exactly those of the member that left", n+1, n, float64(moved)/chunks)
		if math.Abs(float64(moved)-want) > 0.15*want {
			t.Errorf("n=%d: %d chunks moved when a member left, want about %.0f", n+1, moved, want)
		}
	}
}

// Each member is the home of about 1/N of the chunks.
func TestRendezvousBalance(t *testing.T) {
	const chunks = 32000
	ms := names(16)
	count := map[string]int{}
	for c := range chunks {
		count[Home(ms, "img.gabc", int64(c))]++
	}
	want := float64(chunks) / 16
	for _, m := range ms {
		if math.Abs(float64(count[m])-want) > 0.15*want {
			t.Errorf("%s is home of %d chunks, want about %.0f", m, count[m], want)
		}
	}
	// Two bases of one member set do not share homes chunk by chunk.
	same := 0
	for c := range 1000 {
		if Home(ms, "a.g1", int64(c)) == Home(ms, "b.g1", int64(c)) {
			same++
		}
	}
	if same > 150 {
		t.Errorf("bases a and b share the home of %d of 1000 chunks", same)
	}
}

// Rank agrees with Home and with Weight, and does not depend on the order
// members are given in.
func TestRankConsistent(t *testing.T) {
	ms := names(10)
	for c := range int64(200) {
		r := Rank(slices.Clone(ms), "x.g1", c)
		rev := slices.Clone(ms)
		slices.Reverse(rev)
		if !slices.Equal(r, Rank(rev, "x.g1", c)) {
			t.Fatalf("chunk %d: rank depends on input order", c)
		}
		if r[0] != Home(ms, "x.g1", c) {
			t.Fatalf("chunk %d: rank[0] %s, home %s", c, r[0], Home(ms, "x.g1", c))
		}
		for i := 1; i < len(r); i++ {
			if Weight(r[i-1], "x.g1", c) < Weight(r[i], "x.g1", c) {
				t.Fatalf("chunk %d: rank not by weight", c)
			}
		}
	}
	if Home(nil, "x", 0) != "" {
		t.Fatal("home of no members")
	}
}
