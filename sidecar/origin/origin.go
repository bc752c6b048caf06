// Package origin names the device a volume's blocks ultimately come from:
// a local path (a file or a block device os-brick attached) or a Cinder
// iSCSI target. It parses, validates, redacts and keys origin specs, and
// nothing else: it opens no device and links no cgo, so the API and its
// clients can use it. Package stack opens origins (origin/file,
// origin/iscsi).
package origin

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// ErrBadSpec is wrapped by every error about the spec itself (not the
// target).
var ErrBadSpec = errors.New("bad origin")

// Spec names an origin. Exactly one of URL or ConnectionInfo is set.
type Spec struct {
	// URL is a local path, or an iscsi://[user[%password]@]host[:port]/iqn/lun URL.
	URL string
	// ConnectionInfo is Cinder's connection_info "data" dict for an iscsi volume.
	ConnectionInfo map[string]any
	// ReadOnly opens the origin without write access.
	ReadOnly bool
}

// Kind is what sort of origin a spec names.
type Kind int

const (
	KindPath Kind = iota + 1
	KindISCSI
)

// Parsed is a validated spec.
type Parsed struct {
	Kind  Kind
	Path  string // KindPath: absolute, clean
	ISCSI ISCSI  // KindISCSI
}

// Parse validates spec without touching the network or the file system.
func (s Spec) Parse() (Parsed, error) {
	switch {
	case s.URL != "" && s.ConnectionInfo != nil:
		return Parsed{}, fmt.Errorf("%w: give a URL or connection_info, not both", ErrBadSpec)
	case s.ConnectionInfo != nil:
		is, err := ParseConnectionInfo(s.ConnectionInfo)
		if err != nil {
			return Parsed{}, err
		}
		is.ReadOnly = s.ReadOnly
		return Parsed{Kind: KindISCSI, ISCSI: is}, nil
	case strings.HasPrefix(s.URL, "iscsi://"):
		is, err := ParseISCSIURL(s.URL)
		if err != nil {
			return Parsed{}, err
		}
		is.ReadOnly = s.ReadOnly
		return Parsed{Kind: KindISCSI, ISCSI: is}, nil
	case strings.Contains(s.URL, "://"):
		return Parsed{}, fmt.Errorf("%w: unsupported URL scheme in %q (want an absolute path or iscsi://)", ErrBadSpec, RedactURL(s.URL))
	case s.URL == "":
		return Parsed{}, fmt.Errorf("%w: empty origin", ErrBadSpec)
	case strings.ContainsRune(s.URL, 0):
		return Parsed{}, fmt.Errorf("%w: origin path contains a NUL byte", ErrBadSpec)
	}
	p, err := filepath.Abs(s.URL)
	if err != nil {
		return Parsed{}, fmt.Errorf("%w: origin path %q: %v", ErrBadSpec, s.URL, err)
	}
	return Parsed{Kind: KindPath, Path: p}, nil
}

// Key is the origin's identity: two specs with one key name the same
// bytes. An iSCSI LUN is its target IQN and LUN, however it is written (a
// URL or connection_info, any portal, any credentials); a path is its
// absolute form with symlinks resolved when it exists (os-brick's
// /dev/disk/by-path links and the /dev/sdX they point to are one device).
// It never holds a password.
func (s Spec) Key() (string, error) {
	p, err := s.Parse()
	if err != nil {
		return "", err
	}
	return p.Key(), nil
}

// Key is the parsed spec's identity (see Spec.Key).
func (p Parsed) Key() string {
	if p.Kind == KindISCSI {
		if len(p.ISCSI.Portals) == 0 {
			return "iscsi:"
		}
		first := p.ISCSI.Portals[0]
		return fmt.Sprintf("iscsi:%s:%d", strings.ToLower(first.IQN), first.LUN)
	}
	path := p.Path
	if r, err := filepath.EvalSymlinks(path); err == nil {
		path = r
	}
	return "path:" + path
}

// String returns the origin for logs and the API, without a password.
func (s Spec) String() string {
	if s.ConnectionInfo != nil {
		if is, err := ParseConnectionInfo(s.ConnectionInfo); err == nil {
			return is.String()
		}
		return "iscsi connection_info (unparsable)"
	}
	return RedactURL(s.URL)
}
