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

	"github.com/sirupsen/logrus"
	"gopkg.in/ini.v1"
)

// Config is the daemon's configuration after defaults and validation.
type Config struct {
	File string // the file it came from ("" for defaults)

	StateDir     string // exports table, default COW stores
	APISocket    string
	NBDSocketDir string
	// SocketGroup is the group QEMU runs in; the API and NBD sockets are
	// owned by root:SocketGroup, mode 0660. Empty: root's group.
	SocketGroup string
	SocketGID   int // -1 when SocketGroup is empty
	LogLevel    logrus.Level

	CacheDir    string
	CacheBudget int64 // bytes; 0: no limit
	ChunkSize   int64 // bytes, for new caches

	MetricsListen string // host:port; empty: no metrics listener
}

// Defaults are the values used for keys the file does not set.
func Defaults() *Config {
	return &Config{
		StateDir:     "/var/lib/vmthunder",
		APISocket:    "/run/vmthunder/api.sock",
		NBDSocketDir: "/run/vmthunder/nbd",
		CacheDir:     "/var/lib/vmthunder/cache",
		SocketGID:    -1,
		LogLevel:     logrus.InfoLevel,
		ChunkSize:    256 << 10,
	}
}

// known lists every key we read, to warn about typos.
var known = map[string][]string{
	ini.DefaultSection: {"state_dir", "api_socket", "nbd_socket_dir", "socket_group", "log_level"},
	"cache":            {"dir", "size_budget", "chunk_size"},
	"metrics":          {"listen"},
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
	d := ini.DefaultSection
	c.CacheDir = ""
	errs := []error{
		str(d, "state_dir", &c.StateDir, true),
		str(d, "api_socket", &c.APISocket, true),
		str(d, "nbd_socket_dir", &c.NBDSocketDir, true),
		str(d, "socket_group", &c.SocketGroup, false),
		str("cache", "dir", &c.CacheDir, true),
		str("metrics", "listen", &c.MetricsListen, false),
	}
	if err := errors.Join(errs...); err != nil {
		return nil, warnings, err
	}
	if c.CacheDir == "" {
		c.CacheDir = filepath.Join(c.StateDir, "cache")
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
	if c.MetricsListen != "" {
		if _, _, err := splitHostPort(c.MetricsListen); err != nil {
			return nil, warnings, bad("metrics", "listen", err.Error())
		}
	}
	if err := c.resolveGroup(); err != nil {
		return nil, warnings, bad(d, "socket_group", err.Error())
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

// resolveGroup looks the socket group up once, so a typo stops the daemon
// at start rather than leaving sockets QEMU cannot open.
func (c *Config) resolveGroup() error {
	c.SocketGID = -1
	if c.SocketGroup == "" {
		return nil
	}
	if gid, err := strconv.Atoi(c.SocketGroup); err == nil && gid >= 0 {
		c.SocketGID = gid
		return nil
	}
	g, err := user.LookupGroup(c.SocketGroup)
	if err != nil {
		return fmt.Errorf("no group %q on this host", c.SocketGroup)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return fmt.Errorf("group %q has a non-numeric gid %q", c.SocketGroup, g.Gid)
	}
	c.SocketGID = gid
	return nil
}

// Validate checks a Config built in code (tests, defaults) the way Load
// checks a file.
func (c *Config) Validate() error {
	for k, v := range map[string]string{"state_dir": c.StateDir, "api_socket": c.APISocket, "nbd_socket_dir": c.NBDSocketDir, "[cache] dir": c.CacheDir} {
		if !filepath.IsAbs(v) {
			return fmt.Errorf("config: %s %q is not an absolute path", k, v)
		}
	}
	if c.SocketGID < 0 && c.SocketGroup != "" {
		if err := c.resolveGroup(); err != nil {
			return fmt.Errorf("config: socket_group: %w", err)
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
