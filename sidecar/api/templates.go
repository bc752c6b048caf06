package api

import "strings"

// Template is one template volume published in Cinder (`vmthunder
// publish`): read-only, multi-attach, tagged with vmthunder_* metadata.
type Template struct {
	VolumeID   string `json:"volume_id"`
	Name       string `json:"name"`
	ImageID    string `json:"image_id"`   // the Glance/Nova image it holds ("" when published from a file without one)
	Generation string `json:"generation"` // sha256:<hex> of the content's first Size bytes
	Size       int64  `json:"size"`       // content bytes (the volume is rounded up to GiB)
	ChunkSize  int64  `json:"chunk_size"`
	Status     string `json:"status"` // Cinder's: available or in-use
	CreatedAt  string `json:"created_at"`
}

// TemplateList is the answer to GET /v1/templates, newest first.
type TemplateList struct {
	Templates []Template `json:"templates"`
}

// TemplateBasePrefix starts the base id of a template volume's exports:
// tmpl-<volume uuid>, so every export of one template on a node shares
// one cache whatever it is called by.
const TemplateBasePrefix = "tmpl-"

// TemplateBase is the base id of template volume id's exports.
func TemplateBase(volumeID string) string { return TemplateBasePrefix + strings.ToLower(volumeID) }

// ValidVolumeID checks a Cinder volume id: a UUID (8-4-4-4-12 hex).
func ValidVolumeID(id string) error {
	if !isUUID(id) {
		return BadRequest(CodeInvalid, "template_volume %q is not a Cinder volume id (a UUID)", truncate(id, 64))
	}
	return nil
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
