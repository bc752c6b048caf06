// Package config reads the daemon's ini file (/etc/vmthunder/vmthunder.conf),
// in the style of every OpenStack service: a [DEFAULT] section and one
// section per subsystem. Every error names the file, the section and the key.
package config

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"gopkg.in/ini.v1"

	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
)

// Config is the daemon's configuration after defaults and validation.
type Config struct {
	File string // the file it came from ("" for defaults)

	StateDir     string // exports table, default COW stores
	APISocket    string
	NBDSocketDir string
	// APIGroup may use the API socket (nova-compute's and cinder-volume's
	// group, never QEMU's): root:APIGroup mode 0660. Empty: root only,
	// mode 0600. Whoever reaches the API can make the root daemon export
	// what the allowed_* keys below permit.
	APIGroup string
	APIGID   int // -1 when APIGroup is empty
	// NBDGroup is the group QEMU runs in: the NBD sockets are
	// root:NBDGroup mode 0660 in a directory root:NBDGroup 0750. It grants
	// no access to the API. Empty: root only. The deprecated key
	// socket_group sets it.
	NBDGroup string
	NBDGID   int // -1 when NBDGroup is empty

	// AllowedOriginDirs are the directories local origin files may be in
	// (after symlinks and ".." are resolved). Empty: no local files.
	AllowedOriginDirs []string
	// AllowedOriginDevices are globs (filepath.Match) of the block device
	// paths an origin may name, e.g. /dev/disk/by-path/ip-*-iscsi-*-lun-*.
	AllowedOriginDevices []string
	// AllowedCowDirs are the directories COW stores may be created in.
	// Nil: state_dir/cow (Validate fills it in).
	AllowedCowDirs []string

	LogLevel logrus.Level

	CacheDir    string
	CacheBudget int64 // bytes; 0: no limit
	ChunkSize   int64 // bytes, for new caches

	MetricsListen string // host:port; empty: no metrics listener

	// [prefetch]: boot traces of template bases (package prefetch).
	PrefetchEnabled     bool          // record and replay (default true)
	RecordWindow        time.Duration // how long a first boot is recorded; 0: the default
	PrefetchLookahead   int           // trace entries the replay may run ahead of the guest; 0: the default
	PrefetchConcurrency int           // replay fills in flight; 0: the default

	// [peers]: template bases fill from other compute nodes (peers.go).
	Peers Peers

	// [cinder]: template volumes in Cinder (cinder.go); nil without it.
	Cinder *Cinder
}

// Defaults are the values used for keys the file does not set.
func Defaults() *Config {
	return &Config{
		StateDir:     "/var/lib/vmthunder",
		APISocket:    "/run/vmthunder/api.sock",
		NBDSocketDir: "/run/vmthunder/nbd",
		CacheDir:     "/var/lib/vmthunder/cache",
		APIGID:       -1,
		NBDGID:       -1,
		// The by-path names udev gives LUNs of kernel iSCSI sessions
		// (what os-brick's iSCSI connector attaches). Not /dev/disk/by-id/*:
		// that names the host's own disks too.
		AllowedOriginDevices: append([]string(nil), DefaultOriginDevices...),
		LogLevel:             logrus.InfoLevel,
		ChunkSize:            cache.DefaultChunkSize,
		PrefetchEnabled:      true,
	}
}

// DefaultOriginDevices is the default of allowed_origin_devices.
var DefaultOriginDevices = []string{"/dev/disk/by-path/ip-*-iscsi-*-lun-*"}

// known lists every key we read, to warn about typos.
var known = map[string][]string{
	ini.DefaultSection: {"state_dir", "api_socket", "nbd_socket_dir", "api_group", "nbd_group", "socket_group", "log_level",
		"allowed_origin_dirs", "allowed_origin_devices", "allowed_cow_dirs"},
	"cache":    {"dir", "size_budget", "chunk_size"},
	"metrics":  {"listen"},
	"prefetch": {"enabled", "record_window", "lookahead", "concurrency"},
	"peers":    peerKeys,
	"cinder":   cinderKeys,
}

// Load reads path. The warnings are about keys and sections it does not
// know (other components may share the file, so they are not errors).
func Load(path string) (*Config, []string, error) {
	f, err := ini.LoadSources(ini.LoadOptions{Insensitive: false}, path)
	if err != nil {
		return nil, nil, fmt.Errorf("config %s: %w", path, err)
	}
	c := Defaults()
	c.File = path
	var warnings []string
	for _, sec := range f.Sections() {
		keys, ok := known[sec.Name()]
		if !ok {
			if len(sec.Keys()) > 0 {
				warnings = append(warnings, fmt.Sprintf("config %s: unknown section [%s] ignored", path, sec.Name()))
			}
			continue
		}
		for _, k := range sec.Keys() {
			found := false
			for _, want := range keys {
				found = found || k.Name() == want
			}
			if !found {
				warnings = append(warnings, fmt.Sprintf("config %s: unknown key [%s] %s ignored", path, sec.Name(), k.Name()))
			}
		}
	}

	bad := func(sec, key, why string) error {
		return fmt.Errorf("config %s: [%s] %s: %s", path, sec, key, why)
	}
	str := func(sec, key string, dst *string, absPath bool) error {
		// Key() creates a missing key, so ask HasKey first.
		if !f.Section(sec).HasKey(key) {
			return nil
		}
		v := strings.TrimSpace(f.Section(sec).Key(key).String())
		if absPath && !filepath.IsAbs(v) {
			return bad(sec, key, fmt.Sprintf("%q is not an absolute path", v))
		}
		*dst = v
		return nil
	}
	// list reads a comma-separated list; absPath: each item must be an
	// absolute path (a glob for allowed_origin_devices).
	list := func(sec, key string, dst *[]string, absPath bool) error {
		if !f.Section(sec).HasKey(key) {
			return nil
		}
		out := []string{}
		for _, v := range strings.Split(f.Section(sec).Key(key).String(), ",") {
			if v = strings.TrimSpace(v); v == "" {
				continue
			}
			if absPath && !filepath.IsAbs(v) {
				return bad(sec, key, fmt.Sprintf("%q is not an absolute path", v))
			}
			out = append(out, filepath.Clean(v))
		}
		*dst = out
		return nil
	}
	d := ini.DefaultSection
	c.CacheDir = ""
	var socketGroup string
	errs := []error{
		str(d, "state_dir", &c.StateDir, true),
		str(d, "api_socket", &c.APISocket, true),
		str(d, "nbd_socket_dir", &c.NBDSocketDir, true),
		str(d, "api_group", &c.APIGroup, false),
		str(d, "nbd_group", &c.NBDGroup, false),
		str(d, "socket_group", &socketGroup, false),
		list(d, "allowed_origin_dirs", &c.AllowedOriginDirs, true),
		list(d, "allowed_origin_devices", &c.AllowedOriginDevices, true),
		list(d, "allowed_cow_dirs", &c.AllowedCowDirs, true),
		str("cache", "dir", &c.CacheDir, true),
		str("metrics", "listen", &c.MetricsListen, false),
	}
	if err := errors.Join(errs...); err != nil {
		return nil, warnings, err
	}
	if c.CacheDir == "" {
		c.CacheDir = filepath.Join(c.StateDir, "cache")
	}
	if f.Section(d).HasKey("socket_group") {
		// It used to own the API socket as well: QEMU's group could then
		// ask the root daemon for exports. It now means nbd_group only.
		if f.Section(d).HasKey("nbd_group") {
			warnings = append(warnings, fmt.Sprintf("config %s: [DEFAULT] socket_group is deprecated and ignored: nbd_group is set", path))
		} else {
			c.NBDGroup = socketGroup
			warnings = append(warnings, fmt.Sprintf("config %s: [DEFAULT] socket_group is deprecated: it is read as nbd_group (the NBD sockets) and no longer opens the API socket; rename it to nbd_group, and set api_group to nova-compute's group", path))
		}
	}
	for _, g := range []struct {
		key  string
		name string
	}{{"api_group", c.APIGroup}, {"nbd_group", c.NBDGroup}} {
		if _, err := lookupGroup(g.name); err != nil {
			key := g.key
			if key == "nbd_group" && !f.Section(d).HasKey("nbd_group") {
				key = "socket_group"
			}
			return nil, warnings, bad(d, key, err.Error())
		}
	}
	if s := f.Section(d); s.HasKey("log_level") {
		lv, err := logrus.ParseLevel(strings.TrimSpace(s.Key("log_level").String()))
		if err != nil {
			return nil, warnings, bad(d, "log_level", fmt.Sprintf("%q is not a level (debug, info, warning, error)", s.Key("log_level").String()))
		}
		c.LogLevel = lv
	}
	if s := f.Section("cache"); s.HasKey("size_budget") {
		n, err := ParseSize(s.Key("size_budget").String())
		if err != nil {
			return nil, warnings, bad("cache", "size_budget", err.Error())
		}
		c.CacheBudget = n
	}
	if s := f.Section("cache"); s.HasKey("chunk_size") {
		n, err := ParseSize(s.Key("chunk_size").String())
		if err != nil {
			return nil, warnings, bad("cache", "chunk_size", err.Error())
		}
		if n < 4096 || n > 64<<20 || n&(n-1) != 0 {
			return nil, warnings, bad("cache", "chunk_size", fmt.Sprintf("%d is not a power of two between 4K and 64M", n))
		}
		c.ChunkSize = n
	}
	if err := loadPrefetch(f.Section("prefetch"), c, bad); err != nil {
		return nil, warnings, err
	}
	if err := loadPeers(f.Section("peers"), c, bad); err != nil {
		return nil, warnings, err
	}
	if err := loadCinder(f, c, bad); err != nil {
		return nil, warnings, err
	}
	if c.MetricsListen != "" {
		if _, _, err := splitHostPort(c.MetricsListen); err != nil {
			return nil, warnings, bad("metrics", "listen", err.Error())
		}
	}
	if err := c.Validate(); err != nil {
		return nil, warnings, fmt.Errorf("config %s: %s", path, strings.TrimPrefix(err.Error(), "config: "))
	}
	return c, warnings, nil
}

func splitHostPort(s string) (string, int, error) {
	i := strings.LastIndex(s, ":")
	if i < 0 {
		return "", 0, fmt.Errorf("%q is not HOST:PORT", s)
	}
	p, err := strconv.Atoi(s[i+1:])
	if err != nil || p < 0 || p > 65535 {
		return "", 0, fmt.Errorf("%q has no valid port", s)
	}
	return s[:i], p, nil
}

// lookupGroup resolves a group name or number once, so a typo stops the
// daemon at start rather than leaving sockets nobody can open. "": -1.
func lookupGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if gid, err := strconv.Atoi(name); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("no group %q on this host", name)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("group %q has a non-numeric gid %q", name, g.Gid)
	}
	return gid, nil
}

// Validate checks a Config built in code (tests, defaults) the way Load
// checks a file, resolves the groups and fills in allowed_cow_dirs.
func (c *Config) Validate() error {
	for k, v := range map[string]string{"state_dir": c.StateDir, "api_socket": c.APISocket, "nbd_socket_dir": c.NBDSocketDir, "[cache] dir": c.CacheDir} {
		if !filepath.IsAbs(v) {
			return fmt.Errorf("config: %s %q is not an absolute path", k, v)
		}
	}
	var err error
	if c.APIGID, err = lookupGroup(c.APIGroup); err != nil {
		return fmt.Errorf("config: api_group: %w", err)
	}
	if c.NBDGID, err = lookupGroup(c.NBDGroup); err != nil {
		return fmt.Errorf("config: nbd_group: %w", err)
	}
	// The NBD socket directory is open to nbd_group (QEMU): the API
	// socket must not be in it.
	apiDir, nbdDir := filepath.Clean(filepath.Dir(c.APISocket)), filepath.Clean(c.NBDSocketDir)
	if apiDir == nbdDir || strings.HasPrefix(apiDir, nbdDir+"/") {
		return fmt.Errorf("config: api_socket %s is inside nbd_socket_dir %s, which is open to nbd_group: put it elsewhere", c.APISocket, c.NBDSocketDir)
	}
	if c.AllowedCowDirs == nil {
		c.AllowedCowDirs = []string{filepath.Join(c.StateDir, "cow")}
	}
	if err := c.Peers.validate(); err != nil {
		return err
	}
	if c.Cinder != nil {
		if key, why := c.Cinder.Validate(); key != "" {
			return fmt.Errorf("config: [cinder] %s: %s", key, why)
		}
	}
	for k, l := range map[string][]string{"allowed_origin_dirs": c.AllowedOriginDirs, "allowed_origin_devices": c.AllowedOriginDevices, "allowed_cow_dirs": c.AllowedCowDirs} {
		for _, v := range l {
			if !filepath.IsAbs(v) {
				return fmt.Errorf("config: %s: %q is not an absolute path", k, v)
			}
			if k == "allowed_origin_devices" {
				if _, err := filepath.Match(v, "/"); err != nil {
					return fmt.Errorf("config: allowed_origin_devices: %q is not a valid glob: %v", v, err)
				}
			}
		}
	}
	return nil
}

// ParseSize reads "256K", "20G", "1.5T" or a byte count; units are powers
// of 1024, an optional trailing "B" or "iB" is accepted.
func ParseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "IB"), "B")
	if t == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := 1.0
	switch t[len(t)-1] {
	case 'K':
		mult = 1 << 10
	case 'M':
		mult = 1 << 20
	case 'G':
		mult = 1 << 30
	case 'T':
		mult = 1 << 40
	}
	if mult > 1 {
		t = t[:len(t)-1]
	}
	v, err := strconv.ParseFloat(t, 64)
	// !(v >= 0) also refuses NaN, which ParseFloat accepts.
	if err != nil || !(v >= 0) || v*mult > 1<<62 {
		return 0, fmt.Errorf("bad size %q (want a number with an optional K, M, G or T suffix)", s)
	}
	return int64(v * mult), nil
}

// Exists is a small helper for the daemon: a config path that is missing
// is an error only when it was given explicitly.
func Exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// loadPrefetch reads the [prefetch] section.
func loadPrefetch(s *ini.Section, c *Config, bad func(sec, key, why string) error) error {
	if s.HasKey("enabled") {
		v, err := strconv.ParseBool(strings.TrimSpace(s.Key("enabled").String()))
		if err != nil {
			return bad("prefetch", "enabled", fmt.Sprintf("%q is not a boolean", s.Key("enabled").String()))
		}
		c.PrefetchEnabled = v
	}
	if s.HasKey("record_window") {
		v, err := time.ParseDuration(strings.TrimSpace(s.Key("record_window").String()))
		if err != nil || v <= 0 {
			return bad("prefetch", "record_window", fmt.Sprintf("%q is not a positive duration (e.g. 60s)", s.Key("record_window").String()))
		}
		c.RecordWindow = v
	}
	for key, dst := range map[string]*int{"lookahead": &c.PrefetchLookahead, "concurrency": &c.PrefetchConcurrency} {
		if !s.HasKey(key) {
			continue
		}
		v, err := strconv.Atoi(strings.TrimSpace(s.Key(key).String()))
		if err != nil || v < 1 || v > 1<<20 {
			return bad("prefetch", key, fmt.Sprintf("%q is not a count from 1", s.Key(key).String()))
		}
		*dst = v
	}
	return nil
}
