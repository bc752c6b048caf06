package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
)

// The table shows each member's state, how long it has held, the bytes to
// and from it and its bases; a gone member keeps its last bases.
func TestPrintPeers(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	v := api.Peers{Enabled: true, Self: "a", Members: []api.PeerMember{
		{Name: "a", State: "alive", Since: now.Add(-time.Hour), Gossip: "10.0.0.1:7946", ChunkAddr: "10.0.0.1:7947", Bases: []string{"img.g1"}, Self: true, ServedBytes: 65536},
		{Name: "b", State: "dead", Since: now.Add(-90 * time.Second), Gossip: "10.0.0.2:7946", ChunkAddr: "10.0.0.2:7947", Bases: []string{"img.g1"}, ReceivedBytes: 131072},
		{Name: "c", State: "suspect", Since: now.Add(-2 * time.Second), Bases: []string{}},
	}}
	var out bytes.Buffer
	if err := printPeers(&out, v, now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := [][]string{
		{"MEMBER", "STATE", "SINCE", "RECEIVED", "SERVED", "GOSSIP", "CHUNKS", "BASES"},
		{"a", "(self)", "alive", "1h0m0s", "ago", "0", "65536", "10.0.0.1:7946", "10.0.0.1:7947", "img.g1"},
		{"b", "dead", "1m30s", "ago", "131072", "0", "10.0.0.2:7946", "10.0.0.2:7947", "img.g1"},
		{"c", "suspect", "2s", "ago", "0", "0", "-"},
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines:\n%s", len(lines), out.String())
	}
	for i, l := range lines {
		if got := strings.Fields(l); strings.Join(got, " ") != strings.Join(want[i], " ") {
			t.Errorf("line %d: %q, want %q", i, got, want[i])
		}
	}
}
