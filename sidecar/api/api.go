// Package api is the sidecar's HTTP/JSON contract (docs/api.md,
// docs/openapi.yaml): the request and answer types, the error shape and the
// strict request decoder. The daemon serves it; package api/client and the
// CLI speak it.
package api

import (
	"fmt"
	"net/http"
)

// Version prefixes every path.
const Version = "v1"

// Modes an export can have.
const (
	ModeCOW          = "cow"
	ModeWriteThrough = "write-through"
	ModeReadOnly     = "readonly"
)

// Modes lists every mode an export can have.
var Modes = []string{ModeCOW, ModeWriteThrough, ModeReadOnly}

// Export states.
const (
	StateCreating = "creating" // being built (or re-created after a restart)
	StateReady    = "ready"
	StateError    = "error" // could not be re-created after a restart; retried
)

// CreateRequest is the body of POST /v1/exports.
type CreateRequest struct {
	ID string `json:"id"`
	// Origin is a local path or an iscsi:// URL; exactly one of Origin and
	// ConnectionInfo is set.
	Origin string `json:"origin,omitempty"`
	// ConnectionInfo is Cinder's connection_info "data" dict (or the whole
	// connection_info with driver_volume_type "iscsi" and "data").
	ConnectionInfo map[string]any `json:"connection_info,omitempty"`
	// Base names a template: read-only content shared by every export of
	// it on the node, whose cache outlives them. Generation (required with
	// Base) names the content's version; a new generation gets a new cache.
	// Without Base the export's base is its origin volume's own.
	Base       string `json:"base,omitempty"`
	Generation string `json:"generation,omitempty"`
	Mode       string `json:"mode"`
	CowPath    string `json:"cow_path,omitempty"`
	// TemplateVolume is a Cinder volume published as a template (`vmthunder
	// publish`), instead of Origin/ConnectionInfo/Base/Generation: the
	// daemon attaches it read-only through Cinder (one attachment per node)
	// and its base is tmpl-<uuid> at the generation in its metadata. Modes
	// cow and readonly only.
	TemplateVolume string `json:"template_volume,omitempty"`
}

// WarmRequest is the optional body of POST /v1/bases/{id}/warm: the
// origin to fill from when no export of the base is open. Only a template
// can be warmed without an export (a volume's cache lives only while it
// has one): then {id} is the template and Generation is required.
type WarmRequest struct {
	Origin         string         `json:"origin,omitempty"`
	ConnectionInfo map[string]any `json:"connection_info,omitempty"`
	Generation     string         `json:"generation,omitempty"`
	// TraceOnly fills just the chunks of the base's boot trace (a
	// template's; 409 conflict when it has none), not the whole base.
	TraceOnly bool `json:"trace_only,omitempty"`
}

// Export is one export as the API shows it: the answer to create, get,
// refresh, and an item of list. It never carries a password.
type Export struct {
	ID   string `json:"id"`
	Mode string `json:"mode"`
	// Base is the base cache's id (what GET /v1/bases lists).
	Base string `json:"base"`
	// Template and Generation are set for an export of a template.
	Template   string `json:"template,omitempty"`
	Generation string `json:"generation,omitempty"`
	// TemplateVolume is the Cinder template volume the export was made from.
	TemplateVolume string `json:"template_volume,omitempty"`
	Size           int64  `json:"size"`
	Socket         string `json:"socket"`
	ExportName     string `json:"export_name"`
	URI            string `json:"uri"`
	Origin         string `json:"origin"`
	CowPath        string `json:"cow_path,omitempty"`
	// State is "ready", or "error" when the export could not be re-created
	// after a restart (Error says why; the daemon keeps retrying).
	State string       `json:"state"`
	Error string       `json:"error,omitempty"`
	Stats *ExportStats `json:"stats,omitempty"`
}

// ExportStats are an export's counters since the daemon started. The
// cache_* and origin_* values are the base's (shared by its exports).
type ExportStats struct {
	ReadOps       uint64 `json:"read_ops"`
	WriteOps      uint64 `json:"write_ops"`
	ReadBytes     uint64 `json:"read_bytes"`
	WriteBytes    uint64 `json:"write_bytes"`
	Errors        uint64 `json:"errors"`
	CacheHitBytes uint64 `json:"cache_hit_bytes"`
	OriginBytes   uint64 `json:"origin_bytes"`
}

// ExportList is the answer to GET /v1/exports.
type ExportList struct {
	Exports []Export `json:"exports"`
}

// Base describes one base cache.
type Base struct {
	ID           string      `json:"id"`
	Size         int64       `json:"size"`
	ChunkSize    int64       `json:"chunk_size"`
	PresentBytes int64       `json:"present_bytes"`
	DiskBytes    int64       `json:"disk_bytes"`
	InUse        bool        `json:"in_use"`
	Exports      int         `json:"exports"`
	Warm         *WarmStatus `json:"warm,omitempty"`
	// Peers is shown for a template base when [peers] is enabled.
	Peers *BasePeers `json:"peers,omitempty"`
}

// BaseList is the answer to GET /v1/bases.
type BaseList struct {
	Bases []Base `json:"bases"`
}

// Warm states.
const (
	WarmRunning = "running"
	WarmDone    = "done"
	WarmFailed  = "failed"
)

// WarmStatus is a base's last or current warm-up.
type WarmStatus struct {
	// Base is the base cache's id (for a template: the template's id with
	// its generation's suffix), to poll GET /v1/bases/{id} with.
	Base       string `json:"base,omitempty"`
	State      string `json:"state"`
	DoneBytes  int64  `json:"done_bytes"`
	TotalBytes int64  `json:"total_bytes"`
	Error      string `json:"error,omitempty"`
	Started    string `json:"started,omitempty"`
	Finished   string `json:"finished,omitempty"`
}

// Trace is the answer to GET /v1/bases/{id}/trace: a template base's boot
// trace (the order a boot first read its chunks) and its replay counters.
type Trace struct {
	Base       string `json:"base"`
	Present    bool   `json:"present"`     // a trace is stored for the base
	Chunks     int    `json:"chunks"`      // entries of the stored trace
	ChunkSize  int64  `json:"chunk_size"`  // bytes an entry covers
	Bytes      int64  `json:"bytes"`       // data the trace covers
	DurationMS int64  `json:"duration_ms"` // first to last recorded read
	Recording  bool   `json:"recording"`   // a boot is being recorded now
	Replaying  bool   `json:"replaying"`   // the trace is being replayed now
	BackedOff  bool   `json:"backed_off"`  // the last replay stopped: the guest left the trace
	// FromPeer is the member the stored trace was fetched from ("": recorded
	// or imported here).
	FromPeer string `json:"from_peer,omitempty"`
	// Replay counters since the daemon started.
	PrefetchedChunks uint64 `json:"prefetched_chunks"`
	PrefetchedBytes  uint64 `json:"prefetched_bytes"`
	HitChunks        uint64 `json:"hit_chunks"`
	WastedBytes      uint64 `json:"wasted_bytes"`
}

// Health is the answer to GET /v1/health.
type Health struct {
	Status  string `json:"status"`
	Exports int    `json:"exports"`
	Failed  int    `json:"failed"`
}

// Info is the answer to GET /v1/info: what os-brick's
// get_connector_properties needs, and where the sockets are.
type Info struct {
	Host         string `json:"host"`
	Initiator    string `json:"initiator"`
	Version      string `json:"version"`
	APIVersion   string `json:"api_version"`
	NBDSocketDir string `json:"nbd_socket_dir"`
	StateDir     string `json:"state_dir"`
	CacheDir     string `json:"cache_dir"`
	ChunkSize    int64  `json:"chunk_size"`
}

// Stats is the answer to GET /v1/stats: node totals since the daemon
// started (cache counters are per open base and restart when it reopens).
type Stats struct {
	Exports          int    `json:"exports"`
	Bases            int    `json:"bases"`
	ReadOps          uint64 `json:"read_ops"`
	WriteOps         uint64 `json:"write_ops"`
	ReadBytes        uint64 `json:"read_bytes"`
	WriteBytes       uint64 `json:"write_bytes"`
	Errors           uint64 `json:"errors"`
	CacheHits        uint64 `json:"cache_hits"`
	CacheMisses      uint64 `json:"cache_misses"`
	CacheHitBytes    uint64 `json:"cache_hit_bytes"`
	OriginBytes      uint64 `json:"origin_bytes"`
	WriteThroughByte uint64 `json:"write_through_bytes"`
	CacheDiskBytes   int64  `json:"cache_disk_bytes"`
	CacheBudget      int64  `json:"cache_budget_bytes"`
}

// Error is the body of every 4xx/5xx answer, and the error the client
// returns.
type Error struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"error"`
}

func (e *Error) Error() string {
	if e.Code == "" {
		return e.Message
	}
	return fmt.Sprintf("%s (%s)", e.Message, e.Code)
}

// Error codes.
const (
	CodeBadJSON      = "bad_json"           // malformed JSON, trailing data, wrong type
	CodeUnknownField = "unknown_field"      // a key the API does not know
	CodeMissingField = "missing_field"      // a required key is absent or empty
	CodeInvalid      = "invalid"            // a value is wrong (id, mode, path, base, ...)
	CodeBadOrigin    = "bad_origin"         // the origin URL, path or connection_info is malformed
	CodeExists       = "exists"             // an export with this id exists
	CodeNotFound     = "not_found"          // no such export, base or endpoint
	CodeConflict     = "conflict"           // the operation does not fit the current state
	CodeOriginError  = "origin_error"       // the origin could not be opened or read (other causes)
	CodeAuthFailed   = "auth_failed"        // the iSCSI target refused our CHAP credentials or ACL
	CodeUnreachable  = "target_unreachable" // no portal answered (refused, no route, timeout)
	CodeNoSuchTarget = "no_such_target"     // the target has no such IQN or LUN
	CodeBaseConflict = "base_conflict"      // the base is bound to another origin, mode, size or generation
	CodeForbidden    = "forbidden"          // the origin or cow_path is outside what the config allows
	CodeTooLarge     = "too_large"          // the body is larger than MaxBody
	// CodeCinderUnconfigured: a template call without a [cinder] section (503).
	CodeCinderUnconfigured = "cinder_unconfigured"
	// CodeCinderError: Cinder (or Keystone) failed or answered an error (502).
	CodeCinderError = "cinder_error"
	CodeInternal    = "internal"
)

// Errorf builds an *Error.
func Errorf(status int, code, format string, a ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, a...)}
}

// BadRequest is a 400 with the given code.
func BadRequest(code, format string, a ...any) *Error {
	return Errorf(http.StatusBadRequest, code, format, a...)
}
