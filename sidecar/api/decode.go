package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path/filepath"
	"strings"

	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// MaxBody bounds a request body; real ones are well under 4 KiB.
const MaxBody = 1 << 20

// decodeStrict reads exactly one JSON object into v, refusing unknown
// fields and trailing data, and maps every failure to a 4xx *Error.
func decodeStrict(r io.Reader, v any) error {
	data, err := io.ReadAll(io.LimitReader(r, MaxBody+1))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return Errorf(http.StatusRequestEntityTooLarge, CodeTooLarge, "request body larger than %d bytes", MaxBody)
		}
		return BadRequest(CodeBadJSON, "reading request body: %v", err)
	}
	if len(data) > MaxBody {
		return Errorf(http.StatusRequestEntityTooLarge, CodeTooLarge, "request body larger than %d bytes", MaxBody)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return BadRequest(CodeBadJSON, "empty request body (want a JSON object)")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if dec.More() {
		return BadRequest(CodeBadJSON, "malformed JSON: data after the request object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return BadRequest(CodeBadJSON, "malformed JSON: data after the request object")
	}
	return nil
}

func jsonError(err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return BadRequest(CodeBadJSON, "malformed JSON at byte %d: %v", se.Offset, err)
	case errors.As(err, &te):
		if te.Field == "" {
			return BadRequest(CodeBadJSON, "malformed request: want a JSON object, got %s", te.Value)
		}
		return BadRequest(CodeBadJSON, "field %q: want %s, got %s", te.Field, te.Type, te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return BadRequest(CodeBadJSON, "malformed JSON: unexpected end of input")
	}
	msg := err.Error()
	if f, ok := strings.CutPrefix(msg, "json: unknown field "); ok {
		return BadRequest(CodeUnknownField, "unknown field %s", f)
	}
	return BadRequest(CodeBadJSON, "malformed JSON: %s", strings.TrimPrefix(msg, "json: "))
}

// DecodeCreate reads and validates a POST /v1/exports body. The error is
// always an *Error naming the cause.
func DecodeCreate(r io.Reader) (*CreateRequest, error) {
	var req CreateRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, err
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

// DecodeWarm reads a POST /v1/bases/{id}/warm body; an empty body is an
// empty request.
func DecodeWarm(r io.Reader) (*WarmRequest, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxBody+1))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, Errorf(http.StatusRequestEntityTooLarge, CodeTooLarge, "request body larger than %d bytes", MaxBody)
		}
		return nil, BadRequest(CodeBadJSON, "reading request body: %v", err)
	}
	var req WarmRequest
	if len(bytes.TrimSpace(data)) == 0 {
		return &req, nil
	}
	if err := decodeStrict(bytes.NewReader(data), &req); err != nil {
		return nil, err
	}
	if req.Origin != "" || req.ConnectionInfo != nil {
		ci, err := validateOrigin(req.Origin, req.ConnectionInfo)
		if err != nil {
			return nil, err
		}
		req.ConnectionInfo = ci
	}
	return &req, nil
}

// Validate checks a create request and normalises connection_info (a
// whole Cinder connection_info is unwrapped to its "data").
func (req *CreateRequest) Validate() error {
	if req.ID == "" {
		return BadRequest(CodeMissingField, "missing field \"id\"")
	}
	if err := ValidID(req.ID); err != nil {
		return err
	}
	switch req.Mode {
	case "":
		return BadRequest(CodeMissingField, "missing field \"mode\" (cow, write-through or readonly)")
	case ModeCOW, ModeWriteThrough, ModeReadOnly: // Modes
	default:
		return BadRequest(CodeInvalid, "unknown mode %q (want cow, write-through or readonly)", req.Mode)
	}
	if req.TemplateVolume != "" {
		if err := req.validateTemplateVolume(); err != nil {
			return err
		}
		return req.validateCowPath()
	}
	ci, err := validateOrigin(req.Origin, req.ConnectionInfo)
	if err != nil {
		return err
	}
	req.ConnectionInfo = ci
	switch {
	case req.Base != "":
		if err := ValidBase(req.Base); err != nil {
			return err
		}
		if len(req.Base) > MaxTemplateLen {
			return BadRequest(CodeInvalid, "base %q is longer than %d bytes", req.Base, MaxTemplateLen)
		}
		if err := ValidGeneration(req.Generation); err != nil {
			return err
		}
		if req.Mode == ModeWriteThrough {
			return BadRequest(CodeInvalid, "base %q is a template (read-only content shared by its exports): mode write-through would change it under them; use cow, or leave base out to write a volume", req.Base)
		}
	case req.Generation != "":
		return BadRequest(CodeInvalid, "generation is given without a base (it names a template's content version)")
	}
	return req.validateCowPath()
}

// validateTemplateVolume checks a create from a Cinder template volume: it
// names the template alone (the daemon reads origin and generation from
// Cinder) and is never written through.
func (req *CreateRequest) validateTemplateVolume() error {
	if err := ValidVolumeID(req.TemplateVolume); err != nil {
		return err
	}
	for _, f := range []struct {
		key string
		set bool
	}{{"origin", req.Origin != ""}, {"connection_info", req.ConnectionInfo != nil}, {"base", req.Base != ""}, {"generation", req.Generation != ""}} {
		if f.set {
			return BadRequest(CodeInvalid, "give \"template_volume\" or %q, not both (the daemon takes origin, base and generation from the template)", f.key)
		}
	}
	if req.Mode != ModeCOW && req.Mode != ModeReadOnly {
		return BadRequest(CodeInvalid, "template_volume %s is read-only content shared by its exports: mode %s is not allowed (want cow or readonly)", req.TemplateVolume, req.Mode)
	}
	return nil
}

func (req *CreateRequest) validateCowPath() error {
	if req.CowPath != "" {
		if req.Mode != ModeCOW {
			return BadRequest(CodeInvalid, "cow_path is only for mode cow (mode is %s)", req.Mode)
		}
		if !filepath.IsAbs(req.CowPath) || strings.ContainsRune(req.CowPath, 0) {
			return BadRequest(CodeInvalid, "cow_path %q is not an absolute path", req.CowPath)
		}
		if filepath.Clean(req.CowPath) != req.CowPath || strings.HasSuffix(req.CowPath, "/") {
			return BadRequest(CodeInvalid, "cow_path %q is not a clean file path", req.CowPath)
		}
	}
	return nil
}

// ValidID checks an export id: it names the NBD export and the socket file.
func ValidID(id string) error {
	if len(id) == 0 || len(id) > 128 || id == "." || id == ".." || !idChars(id) {
		return BadRequest(CodeInvalid, "invalid id %q (want 1-128 of [A-Za-z0-9._-], not . or ..)", id)
	}
	return nil
}

// ValidGeneration checks a template's content generation: required, and
// bounded (it is recorded beside the cache).
func ValidGeneration(g string) error {
	switch {
	case g == "":
		return BadRequest(CodeMissingField, "missing field \"generation\": a template base must name its content version (for example the image checksum), so a cache never serves another version's bytes")
	case len(g) > 256 || strings.ContainsFunc(g, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return BadRequest(CodeInvalid, "invalid generation (want 1-256 printable characters)")
	}
	return nil
}

// MaxTemplateLen bounds a template's name: its cache's id adds a
// generation suffix.
const MaxTemplateLen = 180

// ValidBase checks a base id: it names a directory in the cache.
func ValidBase(id string) error {
	if len(id) == 0 || len(id) > 200 || id == "." || id == ".." || !idChars(id) {
		return BadRequest(CodeInvalid, "invalid base %q (want 1-200 of [A-Za-z0-9._-], not . or ..)", id)
	}
	return nil
}

func idChars(s string) bool {
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// validateOrigin checks that exactly one origin is given and that it parses,
// without connecting to anything. It returns the connection_info "data".
func validateOrigin(url string, ci map[string]any) (map[string]any, error) {
	switch {
	case url != "" && ci != nil:
		return nil, BadRequest(CodeInvalid, "give \"origin\" or \"connection_info\", not both")
	case url == "" && ci == nil:
		return nil, BadRequest(CodeMissingField, "missing field \"origin\" (a path or iscsi:// URL) or \"connection_info\"")
	case ci != nil:
		ci, err := unwrapConnectionInfo(ci)
		if err != nil {
			return nil, err
		}
		s, err := origin.ParseConnectionInfo(ci)
		if err != nil {
			return nil, BadRequest(CodeBadOrigin, "%v", err)
		}
		return ci, checkIQNs(s)
	case strings.HasPrefix(url, "iscsi://"):
		s, err := origin.ParseISCSIURL(url)
		if err != nil {
			return nil, BadRequest(CodeBadOrigin, "%v", err)
		}
		return nil, checkIQNs(s)
	case strings.Contains(url, "://"):
		return nil, BadRequest(CodeBadOrigin, "origin %q: unsupported URL scheme (want an absolute path or iscsi://)", origin.RedactURL(url))
	case !filepath.IsAbs(url) || strings.ContainsRune(url, 0):
		return nil, BadRequest(CodeBadOrigin, "origin %q is not an absolute path or an iscsi:// URL", url)
	}
	return nil, nil
}

// unwrapConnectionInfo accepts Cinder's whole connection_info
// ({"driver_volume_type": "iscsi", "data": {...}}) as well as its data.
func unwrapConnectionInfo(ci map[string]any) (map[string]any, error) {
	t, ok := ci["driver_volume_type"]
	if !ok {
		return ci, nil
	}
	if t != "iscsi" {
		return nil, BadRequest(CodeBadOrigin, "connection_info: driver_volume_type %v is not supported (want iscsi)", t)
	}
	data, ok := ci["data"].(map[string]any)
	if !ok {
		return nil, BadRequest(CodeBadOrigin, "connection_info: driver_volume_type iscsi without a \"data\" object")
	}
	return data, nil
}

// DescribeOrigin is the origin for answers and logs, without a password.
func DescribeOrigin(url string, ci map[string]any) string {
	if ci != nil {
		s, err := origin.ParseConnectionInfo(ci)
		if err != nil {
			return "iscsi connection_info (unparsable)"
		}
		return s.String()
	}
	return origin.RedactURL(url)
}

func checkIQNs(s origin.ISCSI) error {
	for _, p := range s.Portals {
		if err := ValidIQN(p.IQN); err != nil {
			return err
		}
	}
	return nil
}

// ValidIQN checks an iSCSI name (RFC 3720 3.2.6.3): iqn.YYYY-MM.naming-
// authority[:anything], eui. with 16 hex digits, or naa. with 16 or 32.
// Refusing a malformed name here answers 400 at once instead of a login
// that fails after a network round trip.
func ValidIQN(name string) error {
	bad := func(why string) error {
		return BadRequest(CodeBadOrigin, "bad target IQN %q: %s", name, why)
	}
	lower := strings.ToLower(name)
	switch {
	case len(name) > 223:
		return bad("longer than 223 bytes")
	case strings.HasPrefix(lower, "iqn."):
		rest := lower[4:]
		if len(rest) < 9 || !isDigits(rest[0:4]) || rest[4] != '-' || !isDigits(rest[5:7]) || rest[7] != '.' {
			return bad("want iqn.YYYY-MM.reversed.domain[:name]")
		}
		auth, _, _ := strings.Cut(rest[8:], ":")
		if auth == "" || strings.Trim(auth, "abcdefghijklmnopqrstuvwxyz0123456789.-") != "" {
			return bad("naming authority must be a reversed domain name")
		}
		for _, c := range rest {
			if c <= ' ' || c == '/' || c > '~' {
				return bad("contains a space, a slash or a non-ASCII character")
			}
		}
		return nil
	case strings.HasPrefix(lower, "eui."):
		if len(lower) != 20 || !isHex(lower[4:]) {
			return bad("want eui. and 16 hex digits")
		}
		return nil
	case strings.HasPrefix(lower, "naa."):
		if (len(lower) != 20 && len(lower) != 36) || !isHex(lower[4:]) {
			return bad("want naa. and 16 or 32 hex digits")
		}
		return nil
	}
	return bad("want an iqn., eui. or naa. name")
}

func isDigits(s string) bool { return s != "" && strings.Trim(s, "0123456789") == "" }
func isHex(s string) bool    { return s != "" && strings.Trim(s, "0123456789abcdef") == "" }
