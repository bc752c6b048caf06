package cache

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
)

// ErrConflict is wrapped when a base is asked for with a binding other
// than the one it is open with (another origin, or another writability):
// sharing it would serve one caller the other's bytes.
var ErrConflict = errors.New("base conflict")

// Binding is what a base's cache holds, and so when it may be reused.
//
// A template base is one read-only content generation (Template,
// Generation): its cache survives its exports and is reused by every later
// export of that generation from the same origin. A volume base (Template
// empty) belongs to one writable volume: its cache lives only while the
// volume has an export here (it is emptied when first opened and dropped
// at the last release), because the volume can change whenever no export
// of ours is in its write path.
type Binding struct {
	Template   string `json:"template,omitempty"`
	Generation string `json:"generation,omitempty"`
	// Origin is the origin's key (origin.Spec.Key): the bytes come from
	// there and nowhere else.
	Origin string `json:"origin"`
	// Writable: the base is opened for write-through, so its content moves
	// under readers; it is never shared with readonly or cow exports.
	Writable bool `json:"-"`
}

// IsTemplate reports whether b names a template generation.
func (b Binding) IsTemplate() bool { return b.Template != "" }

func (b Binding) validate() error {
	switch {
	case b.Origin == "":
		return fmt.Errorf("%w: base binding without an origin", blockdev.ErrInvalid)
	case b.IsTemplate() && b.Generation == "":
		return fmt.Errorf("%w: template %s without a generation", blockdev.ErrInvalid, b.Template)
	case b.IsTemplate() && b.Writable:
		return fmt.Errorf("%w: template %s is read-only content: it cannot be written through", blockdev.ErrInvalid, b.Template)
	case !b.IsTemplate() && b.Generation != "":
		return fmt.Errorf("%w: a generation without a template", blockdev.ErrInvalid)
	}
	return nil
}

func (b Binding) String() string {
	if b.IsTemplate() {
		return fmt.Sprintf("template %s generation %s from %s", b.Template, b.Generation, b.Origin)
	}
	if b.Writable {
		return "volume " + b.Origin + " (write-through)"
	}
	return "volume " + b.Origin + " (read-only)"
}

// conflict explains why an open base cannot also be opened with want.
func (b Binding) conflict(id string, want Binding) error {
	switch {
	case b.Template != want.Template || b.Generation != want.Generation || b.Origin != want.Origin:
		return fmt.Errorf("%w: base %s is open as %s; asked for %s", ErrConflict, id, b, want)
	case b.Writable != want.Writable:
		return fmt.Errorf("%w: base %s is open as %s; asked for %s: a write-through export and a readonly or cow export cannot share a volume's base (the cow export's base would change under it)",
			ErrConflict, id, b, want)
	}
	return nil
}

// identityFile records a cache's Binding beside its data, so a cache is
// reused only for the content it was filled from.
const identityFile = "identity.json"

type identityRecord struct {
	Kind string `json:"kind"` // "template" or "volume"
	Binding
}

func readIdentity(dir string) (Binding, error) {
	raw, err := os.ReadFile(filepath.Join(dir, identityFile))
	if err != nil {
		return Binding{}, err
	}
	var rec identityRecord
	if len(raw) > 64<<10 {
		return Binding{}, fmt.Errorf("%s: too large", identityFile)
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return Binding{}, fmt.Errorf("%s: %w", identityFile, err)
	}
	return rec.Binding, nil
}

func writeIdentity(dir string, b Binding) error {
	kind := "volume"
	if b.IsTemplate() {
		kind = "template"
	}
	raw, err := json.MarshalIndent(identityRecord{Kind: kind, Binding: b}, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, identityFile), append(raw, '\n'), 0o600); err != nil {
		return fmt.Errorf("cache identity: %w", err)
	}
	return nil
}

// sameContent reports whether a cache recorded as have may serve want.
func sameContent(have, want Binding) bool {
	return have.Template == want.Template && have.Generation == want.Generation && have.Origin == want.Origin
}
