package origin

import (
	"fmt"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Portal is one path to the LUN: a target portal and the target's IQN and
// LUN as seen through it (Cinder's multipath form lists them per portal).
type Portal struct {
	Addr string // host:port
	IQN  string
	LUN  int
}

// ISCSI says how to reach a LUN.
type ISCSI struct {
	// Portals are tried in order; when one stops answering, I/O moves to
	// the next.
	Portals []Portal
	// CHAP credentials (the target authenticates the initiator). Empty User:
	// no CHAP.
	User, Password string
	// Initiator is our IQN; empty: DefaultInitiator().
	Initiator string
	ReadOnly  bool
	// Timeout bounds one command, a TCP connect and a login; 0: 15s.
	Timeout time.Duration
	// RetryTimeout is how long an I/O is retried across reconnects and
	// portal failover before its error reaches the reader; 0: 60s.
	RetryTimeout time.Duration
	// Sessions is the number of iSCSI sessions, each with many commands in
	// flight; 0: 1. One async session keeps tgtd busy at queue depth 32 and
	// measured fastest on a small host; more help against a target that
	// limits per-session queue depth.
	Sessions int
}

const defaultPort = 3260

// ParseISCSIURL parses iscsi://[user[%password]@]host[:port]/iqn/lun, the form
// QEMU and libiscsi take (libiscsi also takes user:password). The IQN may
// carry %XX escapes (%3A for ':').
func ParseISCSIURL(raw string) (ISCSI, error) {
	bad := func(why string) (ISCSI, error) {
		return ISCSI{}, fmt.Errorf("%w: iscsi URL %s: %s", ErrBadSpec, RedactURL(raw), why)
	}
	rest, ok := strings.CutPrefix(raw, "iscsi://")
	if !ok {
		return bad("want iscsi://[user[%password]@]host[:port]/iqn/lun")
	}
	var s ISCSI
	// An IQN never holds '@', so the last one ends the credentials even if
	// the password has '@' or '/' in it.
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		user := rest[:at]
		rest = rest[at+1:]
		u, p, hasPass := cutCredentials(user)
		if u == "" || !hasPass {
			return bad("credentials must be user%password")
		}
		s.User, s.Password = u, p
	}
	hostport, path, ok := strings.Cut(rest, "/")
	if !ok || hostport == "" {
		return bad("missing host")
	}
	if q := strings.IndexAny(path, "?#"); q >= 0 {
		if query := path[q:]; strings.Contains(query, "target_user") || strings.Contains(query, "target_password") {
			return bad(errMutualCHAP)
		}
		if path[q] == '?' {
			return bad("query parameters are not supported")
		}
		path = path[:q]
	}
	iqn, lunStr, ok := strings.Cut(path, "/")
	if !ok || iqn == "" {
		return bad("missing /iqn/lun")
	}
	lunStr = strings.TrimSuffix(lunStr, "/")
	lun, err := strconv.Atoi(lunStr)
	if err != nil || lun < 0 || lun > 16383 {
		return bad(fmt.Sprintf("bad LUN %q", lunStr))
	}
	iqn, err = unescape(iqn)
	if err != nil {
		return bad(err.Error())
	}
	addr, err := normPortal(hostport)
	if err != nil {
		return bad(err.Error())
	}
	s.Portals = []Portal{{Addr: addr, IQN: iqn, LUN: lun}}
	return s, nil
}

// cutCredentials splits user%password, or user:password when there is no
// '%', as libiscsi does (so QEMU-style URLs with ':' work and are redacted).
func cutCredentials(s string) (user, password string, ok bool) {
	if u, p, ok := strings.Cut(s, "%"); ok {
		return u, p, true
	}
	return strings.Cut(s, ":")
}

func unescape(s string) (string, error) {
	if !strings.Contains(s, "%") {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("bad escape in %q", s)
		}
		v, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil {
			return "", fmt.Errorf("bad escape in %q", s)
		}
		b.WriteByte(byte(v))
		i += 2
	}
	return b.String(), nil
}

// normPortal checks host[:port] (or [v6]:port), adding the default port.
func normPortal(hp string) (string, error) {
	if i := strings.Index(hp, ","); i >= 0 { // Cinder may append ",tpgt"
		hp = hp[:i]
	}
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		if strings.Count(hp, ":") > 1 && !strings.HasPrefix(hp, "[") {
			host, port = hp, "" // bare IPv6 address
		} else if strings.HasPrefix(hp, "[") && strings.HasSuffix(hp, "]") {
			host, port = hp[1:len(hp)-1], ""
		} else if !strings.Contains(hp, ":") {
			host, port = hp, ""
		} else {
			return "", fmt.Errorf("bad portal %q", hp)
		}
	}
	if host == "" {
		return "", fmt.Errorf("bad portal %q: no host", hp)
	}
	if port == "" {
		port = strconv.Itoa(defaultPort)
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return "", fmt.Errorf("bad portal %q: port", hp)
	}
	return net.JoinHostPort(host, port), nil
}

// ParseConnectionInfo reads Cinder's connection_info "data" dict for an
// iscsi volume: target_portal/target_iqn/target_lun, or the multipath
// lists target_portals/target_iqns/target_luns, and auth_method "CHAP"
// with auth_username/auth_password. Values may be strings or numbers.
func ParseConnectionInfo(ci map[string]any) (ISCSI, error) {
	bad := func(format string, a ...any) (ISCSI, error) {
		return ISCSI{}, fmt.Errorf("%w: iscsi connection_info: %s", ErrBadSpec, fmt.Sprintf(format, a...))
	}
	var s ISCSI
	portals, err := list(ci, "target_portals")
	if err != nil {
		return bad("%v", err)
	}
	iqns, err := list(ci, "target_iqns")
	if err != nil {
		return bad("%v", err)
	}
	luns, err := list(ci, "target_luns")
	if err != nil {
		return bad("%v", err)
	}
	if len(portals) == 0 {
		p, ok := ci["target_portal"]
		if !ok {
			return bad("no target_portal or target_portals")
		}
		portals = []any{p}
	}
	for i, p := range portals {
		ps, err := str(p)
		if err != nil {
			return bad("target_portal %v: %v", p, err)
		}
		addr, err := normPortal(ps)
		if err != nil {
			return bad("%v", err)
		}
		var iqnV, lunV any
		if i < len(iqns) {
			iqnV = iqns[i]
		} else if v, ok := ci["target_iqn"]; ok {
			iqnV = v
		} else {
			return bad("no target_iqn for portal %s", addr)
		}
		if i < len(luns) {
			lunV = luns[i]
		} else if v, ok := ci["target_lun"]; ok {
			lunV = v
		} else {
			return bad("no target_lun for portal %s", addr)
		}
		iqn, err := str(iqnV)
		if err != nil || iqn == "" {
			return bad("bad target_iqn %v", iqnV)
		}
		lun, err := integer(lunV)
		if err != nil || lun < 0 || lun > 16383 {
			return bad("bad target_lun %v", lunV)
		}
		s.Portals = append(s.Portals, Portal{Addr: addr, IQN: iqn, LUN: lun})
	}
	for k := range ci {
		if isMutualCHAPKey(k) {
			return bad("%s (key %s)", errMutualCHAP, k)
		}
	}
	if m, ok := ci["auth_method"]; ok && m != nil {
		method, _ := str(m)
		switch strings.ToUpper(method) {
		case "CHAP":
			u, _ := str(ci["auth_username"])
			p, _ := str(ci["auth_password"])
			if u == "" {
				return bad("auth_method CHAP without auth_username")
			}
			if p == "" {
				// An empty secret would only fail later, as a login refusal.
				return bad("auth_method CHAP without auth_password")
			}
			s.User, s.Password = u, p
		case "", "NONE":
		default:
			return bad("unsupported auth_method %q (want CHAP)", method)
		}
	}
	return s, nil
}

// Mutual CHAP (the target proving itself to us as well) is refused, never
// ignored: a login that skipped it would trust a target the operator asked
// to have authenticated.
const errMutualCHAP = "mutual CHAP (the target authenticating to the initiator) is not supported: configure the backend for one-way CHAP"

func isMutualCHAPKey(k string) bool {
	k = strings.ToLower(k)
	switch k {
	case "target_username", "target_password", "target_user", "target_secret",
		"auth_username_in", "auth_password_in", "username_in", "password_in":
		return true
	}
	return strings.Contains(k, "mutual")
}

func list(ci map[string]any, key string) ([]any, error) {
	v, ok := ci[key]
	if !ok || v == nil {
		return nil, nil
	}
	switch l := v.(type) {
	case []any:
		return l, nil
	case []string:
		out := make([]any, len(l))
		for i := range l {
			out[i] = l[i]
		}
		return out, nil
	case []int:
		out := make([]any, len(l))
		for i := range l {
			out[i] = l[i]
		}
		return out, nil
	}
	return nil, fmt.Errorf("%s is %T, want a list", key, v)
}

func str(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case nil:
		return "", nil
	case fmt.Stringer:
		return x.String(), nil
	case float64, float32, int, int64, int32, uint, uint64, uint32:
		return fmt.Sprint(x), nil
	}
	return "", fmt.Errorf("%T is not a string", v)
}

func integer(v any) (int, error) {
	switch x := v.(type) {
	case int:
		return x, nil
	case int64:
		return int(x), nil
	case int32:
		return int(x), nil
	case uint32:
		return int(x), nil
	case uint64:
		return int(x), nil
	case float64:
		if x != math.Trunc(x) {
			return 0, fmt.Errorf("%v is not an integer", x)
		}
		return int(x), nil
	case string:
		return strconv.Atoi(strings.TrimSpace(x))
	}
	return 0, fmt.Errorf("%T is not an integer", v)
}

// String describes the spec for logs and the API, without the password.
func (s ISCSI) String() string {
	var b strings.Builder
	for i, p := range s.Portals {
		if i > 0 {
			b.WriteString(",")
		}
		b.WriteString("iscsi://")
		if s.User != "" {
			b.WriteString(s.User + "%***@")
		}
		fmt.Fprintf(&b, "%s/%s/%d", p.Addr, p.IQN, p.LUN)
	}
	return b.String()
}

// RedactURL removes the password from an iscsi:// URL (anything else is
// returned unchanged), for logs and error messages.
func RedactURL(raw string) string {
	rest, ok := strings.CutPrefix(raw, "iscsi://")
	if !ok {
		return raw
	}
	// libiscsi also takes the target's secret (mutual CHAP) as a query
	// parameter.
	const tp = "target_password="
	if i := strings.Index(rest, tp); i >= 0 {
		end := i + len(tp)
		j := strings.IndexAny(rest[end:], "&#")
		if j < 0 {
			j = len(rest) - end
		}
		rest = rest[:end] + "***" + rest[end+j:]
	}
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return "iscsi://" + rest
	}
	user, _, hasPass := cutCredentials(rest[:at])
	if !hasPass {
		return "iscsi://" + rest
	}
	return "iscsi://" + user + "%***@" + rest[at+1:]
}

// DefaultInitiator is the host's initiator name from
// /etc/iscsi/initiatorname.iscsi (what open-iscsi and os-brick report to
// Cinder), else iqn.2026-11.org.vmthunder:<hostname>.
func DefaultInitiator() string {
	if b, err := os.ReadFile("/etc/iscsi/initiatorname.iscsi"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			line = strings.TrimSpace(line)
			if v, ok := strings.CutPrefix(line, "InitiatorName="); ok && v != "" {
				return v
			}
		}
	}
	h, err := os.Hostname()
	if err != nil || h == "" {
		h = "localhost"
	}
	h = strings.ToLower(strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			return r
		}
		return '-'
	}, h))
	return "iqn.2026-11.org.vmthunder:" + h
}
