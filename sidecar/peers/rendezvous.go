// Package peers lets compute nodes serve each other the chunks of template
// bases, so the storage node sends about one copy of a boot wave's working
// set per image (see DESIGN.md, "Peers").
//
// The pieces, each usable and tested alone:
//
//   - rendezvous.go: the home of a chunk — highest-random-weight hashing of
//     (base id, chunk index) over the members that have the base open;
//   - membership.go: who those members are (hashicorp/memberlist), each
//     advertising its chunk server's address and the template bases it has
//     open; memberstate.go: each one's state (alive, suspect, dead, left)
//     and since when;
//   - manifest.go: the sha256 of every chunk of one template generation,
//     made once from the origin and never taken from a peer;
//   - server.go, client.go: chunk transfer over mutually authenticated TLS
//     (HTTP/2: many requests in flight per peer, no head-of-line blocking
//     of one chunk behind another);
//   - source.go: the blockdev.Device a template base's cache fills from:
//     the home, then the next candidates, then the origin; every chunk from
//     a peer verified against the manifest; a guest read never fails
//     because a peer did;
//   - traffic.go: the chunk bytes exchanged with each member and the
//     latency of chunk fetches by outcome, for the daemon's metrics.
//
// Only template bases (read-only content generations, cache.Binding with a
// Template) may be shared between nodes: a volume's bytes can change under
// any cache of them.
package peers

import (
	"encoding/binary"
	"hash/fnv"
	"sort"
)

// Weight is the rendezvous weight of member for chunk c of base: the member
// with the highest weight is the chunk's home. It depends on nothing else,
// so every node computes the same weights whatever members it knows of.
func Weight(member, base string, c int64) uint64 {
	return mix(nameHash(member) ^ keyHash(base, c))
}

func nameHash(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64()
}

func keyHash(base string, c int64) uint64 {
	h := fnv.New64a()
	h.Write([]byte(base))
	var b [9]byte // a separator, so ("a1", 2) and ("a", 12) differ
	binary.BigEndian.PutUint64(b[1:], uint64(c))
	h.Write(b[:])
	return h.Sum64()
}

// mix is splitmix64's finalizer: every input bit moves every output bit,
// which FNV alone does not do for its high bits.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Rank orders members for chunk c of base, highest weight first (ties,
// which need a 64-bit collision, by name). It sorts members in place and
// returns it.
func Rank(members []string, base string, c int64) []string {
	k := keyHash(base, c)
	w := make(map[string]uint64, len(members))
	for _, m := range members {
		w[m] = mix(nameHash(m) ^ k)
	}
	sort.Slice(members, func(i, j int) bool {
		wi, wj := w[members[i]], w[members[j]]
		if wi != wj {
			return wi > wj
		}
		return members[i] < members[j]
	})
	return members
}

// Home is the member with the highest weight for chunk c of base, "" when
// there are no members.
func Home(members []string, base string, c int64) string {
	k := keyHash(base, c)
	best, bw := "", uint64(0)
	for _, m := range members {
		w := mix(nameHash(m) ^ k)
		if best == "" || w > bw || (w == bw && m < best) {
			best, bw = m, w
		}
	}
	return best
}
