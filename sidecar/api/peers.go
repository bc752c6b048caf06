package api

import "time"

// BasePeers is how a template base's cache fills when [peers] is enabled:
// from peers (it has a manifest of chunk digests to verify them with) or
// from its origin only, and why.
type BasePeers struct {
	// Source is "peers" (chunks from other nodes, verified, then the
	// origin) or "origin".
	Source string `json:"source"`
	// Reason says why a base fills from its origin only (no manifest, a
	// manifest of another size, ...).
	Reason string `json:"reason,omitempty"`
	// ManifestRoot is the root digest of the base's manifest, if it has one.
	ManifestRoot string `json:"manifest_root,omitempty"`
	// ManifestFrom says where a template volume's manifest came from
	// ("peer NAME" or "manifest volume ID"), when this daemon fetched it.
	ManifestFrom string `json:"manifest_from,omitempty"`
	// CorruptManifests counts manifests from peers refused: not the root
	// the template's Cinder metadata names.
	CorruptManifests uint64 `json:"corrupt_manifests"`
	// Bytes this node read for the base from its origin, from peers, and
	// served to peers, since the daemon started.
	FromOriginBytes uint64 `json:"from_origin_bytes"`
	FromPeersBytes  uint64 `json:"from_peers_bytes"`
	ServedBytes     uint64 `json:"served_bytes"`
	// CorruptChunks counts chunks from peers that failed verification and
	// were dropped (then read from the next candidate or the origin).
	CorruptChunks uint64 `json:"corrupt_chunks"`
}

// Manifest describes a template base's chunk manifest (the answer to
// POST /v1/bases/{id}/manifest).
type Manifest struct {
	Base      string `json:"base"`
	Root      string `json:"root"`
	Size      int64  `json:"size"`
	ChunkSize int64  `json:"chunk_size"`
	Chunks    int64  `json:"chunks"`
}

// PeerMember is one member of the peers cluster as this node sees it.
type PeerMember struct {
	Name string `json:"name"`
	// State is alive, suspect (this node's gossip probes of it failed; it
	// is still asked for chunks), dead (declared failed) or left (said
	// goodbye); dead and left members are listed, with their last bases,
	// for a while ([peers] forgets them after 5 minutes), and never asked.
	State string `json:"state"`
	// Since is when this node saw the member enter State.
	Since     time.Time `json:"since"`
	Gossip    string    `json:"gossip"`
	ChunkAddr string    `json:"chunk_addr"`
	// Bases are the template bases it serves (when gone: served last).
	Bases []string `json:"bases"`
	Self  bool     `json:"self,omitempty"`
	// Chunk bytes this node received from the member (verified) and
	// served to it, while the member has been known.
	ReceivedBytes uint64 `json:"received_bytes"`
	ServedBytes   uint64 `json:"served_bytes"`
}

// Peers is the answer to GET /v1/peers.
type Peers struct {
	Enabled bool         `json:"enabled"`
	Self    string       `json:"self,omitempty"`
	Members []PeerMember `json:"members"`
}
