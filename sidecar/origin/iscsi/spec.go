package iscsi

import "github.com/vmthunder/vmthunder/sidecar/origin"

// The spec of an iSCSI origin is parsed in package origin (pure Go, no
// cgo); these names keep this package's callers short.
type (
	Spec   = origin.ISCSI
	Portal = origin.Portal
)

// ErrBadSpec is origin.ErrBadSpec.
var ErrBadSpec = origin.ErrBadSpec

var (
	ParseURL            = origin.ParseISCSIURL
	ParseConnectionInfo = origin.ParseConnectionInfo
	Redact              = origin.RedactURL
	DefaultInitiator    = origin.DefaultInitiator
)
