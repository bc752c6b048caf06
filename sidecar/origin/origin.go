// Package origin opens the device a volume's blocks ultimately come from:
// a local path (a file or a block device os-brick attached) or, in package
// origin/iscsi, a Cinder iSCSI target read in user space.
package origin

import (
	"fmt"
	"strings"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/origin/file"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

// Spec names an origin. Exactly one of URL or ConnectionInfo is set.
type Spec struct {
	// URL is a local path, or an iscsi://[user[%password]@]host[:port]/iqn/lun URL.
	URL string
	// ConnectionInfo is Cinder's connection_info "data" dict for an iscsi volume.
	ConnectionInfo map[string]any
	// ReadOnly opens the origin without write access.
	ReadOnly bool
}

// ErrBadSpec is wrapped by every error about the spec itself (not the
// target). It is the iscsi package's value, so both name one error.
var ErrBadSpec = iscsi.ErrBadSpec

// Open opens the origin named by spec.
func Open(spec Spec) (blockdev.Device, error) {
	switch {
	case spec.URL != "" && spec.ConnectionInfo != nil:
		return nil, fmt.Errorf("%w: give a URL or connection_info, not both", ErrBadSpec)
	case spec.ConnectionInfo != nil:
		return openISCSIInfo(spec.ConnectionInfo, spec.ReadOnly)
	case strings.HasPrefix(spec.URL, "iscsi://"):
		return openISCSIURL(spec.URL, spec.ReadOnly)
	case strings.Contains(spec.URL, "://"):
		return nil, fmt.Errorf("%w: unsupported URL scheme in %q (want a path or iscsi://)", ErrBadSpec, spec.URL)
	case spec.URL == "":
		return nil, fmt.Errorf("%w: empty origin", ErrBadSpec)
	default:
		return file.Open(spec.URL, spec.ReadOnly)
	}
}

// The iscsi origin; variables so tests can stand in for a target.
var (
	openISCSIURL = func(u string, ro bool) (blockdev.Device, error) {
		d, err := iscsi.OpenURL(u, ro)
		if err != nil {
			return nil, err
		}
		return d, nil
	}
	openISCSIInfo = func(ci map[string]any, ro bool) (blockdev.Device, error) {
		d, err := iscsi.OpenConnectionInfo(ci, ro)
		if err != nil {
			return nil, err
		}
		return d, nil
	}
)

// String returns the origin for logs and the API, without a password.
func (s Spec) String() string {
	if s.ConnectionInfo != nil {
		if is, err := iscsi.ParseConnectionInfo(s.ConnectionInfo); err == nil {
			return is.String()
		}
		return "iscsi connection_info (unparsable)"
	}
	return iscsi.Redact(s.URL)
}
