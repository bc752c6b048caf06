package peers

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

func fastGossip(c *memberlist.Config) {
	c.GossipInterval = 30 * time.Millisecond
	c.ProbeInterval = 150 * time.Millisecond
	c.ProbeTimeout = 80 * time.Millisecond
	c.SuspicionMult = 2
	c.TCPTimeout = 500 * time.Millisecond
	c.PushPullInterval = time.Second
	c.GossipToTheDeadTime = time.Second
}

func waitFor(t *testing.T, what string, within time.Duration, ok func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !ok() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// memberNames lists the live members with their bases.
func memberNames(m *Membership) string {
	var out []string
	for _, mb := range m.Members() {
		if mb.Live() {
			out = append(out, mb.Name+"["+strings.Join(mb.Bases, ",")+"]")
		}
	}
	return strings.Join(out, " ")
}

// Three members on loopback: joins, new bases, a leave and a crash are
// seen by the others within seconds; Serving lists who has a base open.
func TestMembershipJoinLeave(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	var ms []*Membership
	for i, name := range []string{"m-a", "m-b", "m-c"} {
		o := MembershipOptions{Name: name, Bind: "127.0.0.1:0", SecretKey: key,
			ChunkAddr: fmt.Sprintf("127.0.0.1:%d", 9000+i), Tune: fastGossip}
		if i > 0 {
			o.Join = []string{ms[0].GossipAddr()}
		}
		m, err := JoinCluster(o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Shutdown() })
		ms = append(ms, m)
	}
	all := func(want string) func() bool {
		return func() bool {
			for _, m := range ms {
				if memberNames(m) != want {
					return false
				}
			}
			return true
		}
	}
	d := waitFor(t, "three members see each other", 5*time.Second, all("m-a[] m-b[] m-c[]"))
	t.Logf("joined in %v", d)

	changed := make(chan struct{}, 16)
	ms[0].OnChange(func() { changed <- struct{}{} })
	if err := ms[1].SetBases([]string{"img.g2", "img.g1", "img.g1"}); err != nil {
		t.Fatal(err)
	}
	if err := ms[2].SetBases([]string{"img.g1"}); err != nil {
		t.Fatal(err)
	}
	d = waitFor(t, "bases advertised", 5*time.Second, all("m-a[] m-b[img.g1,img.g2] m-c[img.g1]"))
	t.Logf("bases seen in %v", d)
	select {
	case <-changed:
	case <-time.After(time.Second):
		t.Fatal("no change notified")
	}
	serving := ms[0].Serving("img.g1")
	slices.SortFunc(serving, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
	if len(serving) != 2 || serving[0] != (Peer{"m-b", "127.0.0.1:9001"}) || serving[1] != (Peer{"m-c", "127.0.0.1:9002"}) {
		t.Fatalf("serving img.g1: %v", serving)
	}
	if got := ms[1].Serving("img.g2"); len(got) != 1 || got[0].Name != "m-b" {
		t.Fatalf("m-b does not see itself serving img.g2: %v", got)
	}

	// m-c leaves politely.
	if err := ms[2].Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	d = waitFor(t, "a leave seen", 5*time.Second, func() bool {
		return memberNames(ms[0]) == "m-a[] m-b[img.g1,img.g2]" && memberNames(ms[1]) == "m-a[] m-b[img.g1,img.g2]"
	})
	t.Logf("leave seen in %v", d)

	// m-b crashes (no leave): m-a finds out by probing.
	ms[1].Shutdown()
	d = waitFor(t, "a crash seen", 8*time.Second, func() bool { return memberNames(ms[0]) == "m-a[]" })
	t.Logf("crash seen in %v", d)
	if len(ms[0].Serving("img.g1")) != 0 {
		t.Fatal("a dead member still serves")
	}
}

// A member with a gossip key other than the cluster's cannot join.
func TestMembershipWrongKey(t *testing.T) {
	a, err := JoinCluster(MembershipOptions{Name: "k-a", Bind: "127.0.0.1:0", SecretKey: []byte("0123456789abcdef"), ChunkAddr: "127.0.0.1:1", Tune: fastGossip})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown()
	b, err := JoinCluster(MembershipOptions{Name: "k-b", Bind: "127.0.0.1:0", SecretKey: []byte("fedcba9876543210"), ChunkAddr: "127.0.0.1:2",
		Join: []string{a.GossipAddr()}, Tune: fastGossip})
	if err == nil {
		defer b.Shutdown()
		time.Sleep(300 * time.Millisecond)
		if len(a.Members()) != 1 {
			t.Fatalf("a member with the wrong key joined: %s", memberNames(a))
		}
	}
	if _, err := JoinCluster(MembershipOptions{Name: "k-c", Bind: "127.0.0.1:0", SecretKey: []byte("short"), ChunkAddr: "127.0.0.1:3"}); err == nil {
		t.Fatal("a 5-byte gossip key accepted")
	}
	if _, err := JoinCluster(MembershipOptions{Name: "bad name!", Bind: "127.0.0.1:0", ChunkAddr: "127.0.0.1:3"}); err == nil {
		t.Fatal("a member name that is no DNS name accepted")
	}
}

// Metadata: bounded, cut the same way on every node, malformed refused.
func TestMetaEncoding(t *testing.T) {
	var ids []string
	for i := range 40 {
		ids = append(ids, fmt.Sprintf("template-%02d.g0123456789ab", i))
	}
	b, cut := encodeMeta("10.0.0.1:7947", ids, false, memberlist.MetaMaxSize)
	if len(b) > memberlist.MetaMaxSize || cut == 0 {
		t.Fatalf("%d bytes, %d cut", len(b), cut)
	}
	addr, got, leaving, err := decodeMeta(b)
	if err != nil || addr != "10.0.0.1:7947" || !slices.Equal(got, ids[:len(ids)-cut]) || leaving {
		t.Fatalf("decode: %v %s %v %v", err, addr, got, leaving)
	}
	lb, _ := encodeMeta("10.0.0.1:7947", ids[:2], true, memberlist.MetaMaxSize)
	if _, got, leaving, err := decodeMeta(lb); err != nil || !leaving || !slices.Equal(got, ids[:2]) {
		t.Fatalf("decode a leaving member's metadata: %v %v %v", err, got, leaving)
	}
	for _, bad := range [][]byte{nil, {2}, {1, 0, 1, ':'}, {2, 0, 5, 'a'}, {2, 4, 1, ':'}, append(slices.Clone(b[:len(b)-1]), 0xff), {2, 0, 3, 'a', ':', '1', 2, '.', '.'}} {
		if _, _, _, err := decodeMeta(bad); err == nil {
			t.Errorf("malformed metadata %q accepted", bad)
		}
	}
}
