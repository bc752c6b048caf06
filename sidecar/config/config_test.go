package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmthunder.conf")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoad(t *testing.T) {
	p := write(t, `[DEFAULT]
state_dir = /srv/vmt
api_socket = /run/x/api.sock
nbd_socket_dir = /run/x/nbd
socket_group = root
log_level = debug
typo_key = 1

[cache]
size_budget = 20G
chunk_size = 1M

[metrics]
listen = 127.0.0.1:9470
`)
	c, warn, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.StateDir != "/srv/vmt" || c.APISocket != "/run/x/api.sock" || c.NBDSocketDir != "/run/x/nbd" {
		t.Errorf("paths: %+v", c)
	}
	if c.CacheDir != "/srv/vmt/cache" {
		t.Errorf("cache dir defaults under state_dir, got %s", c.CacheDir)
	}
	if c.CacheBudget != 20<<30 || c.ChunkSize != 1<<20 {
		t.Errorf("sizes: budget %d chunk %d", c.CacheBudget, c.ChunkSize)
	}
	if c.NBDGID != 0 || c.NBDGroup != "root" || c.APIGID != -1 || c.LogLevel != logrus.DebugLevel || c.MetricsListen != "127.0.0.1:9470" {
		t.Errorf("got %+v", c)
	}
	// socket_group is read as nbd_group, with a warning; typo_key warns.
	if len(warn) != 2 || !strings.Contains(strings.Join(warn, "\n"), "typo_key") || !strings.Contains(strings.Join(warn, "\n"), "socket_group is deprecated") {
		t.Errorf("want warnings naming typo_key and socket_group, got %q", warn)
	}
}

func TestDefaults(t *testing.T) {
	c, _, err := Load(write(t, "# nothing\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := Defaults()
	if c.StateDir != d.StateDir || c.APISocket != d.APISocket || c.CacheDir != d.CacheDir ||
		c.ChunkSize != 256<<10 || c.CacheBudget != 0 || c.APIGID != -1 || c.NBDGID != -1 || c.MetricsListen != "" {
		t.Errorf("defaults: %+v", c)
	}
	// Secure by default: no local files, kernel-iSCSI LUNs by path, COW
	// stores only under state_dir/cow.
	if len(c.AllowedOriginDirs) != 0 || strings.Join(c.AllowedOriginDevices, ",") != "/dev/disk/by-path/ip-*-iscsi-*-lun-*" ||
		strings.Join(c.AllowedCowDirs, ",") != "/var/lib/vmthunder/cow" {
		t.Errorf("allowed_* defaults: %q %q %q", c.AllowedOriginDirs, c.AllowedOriginDevices, c.AllowedCowDirs)
	}
}

// Every bad value is an error naming the file, the section and the key.
func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"[cache]\nsize_budget = 20X\n", "[cache] size_budget"},
		{"[cache]\nchunk_size = 3000\n", "[cache] chunk_size"},
		{"[cache]\ndir = relative/dir\n", "[cache] dir"},
		{"state_dir = var/lib\n", "[DEFAULT] state_dir"},
		{"log_level = loud\n", "[DEFAULT] log_level"},
		{"socket_group = no-such-group-vmt\n", "[DEFAULT] socket_group"},
		{"nbd_group = no-such-group-vmt\n", "[DEFAULT] nbd_group"},
		{"api_group = no-such-group-vmt\n", "[DEFAULT] api_group"},
		{"allowed_origin_dirs = /srv, images\n", "[DEFAULT] allowed_origin_dirs"},
		{"allowed_cow_dirs = cow\n", "[DEFAULT] allowed_cow_dirs"},
		{"allowed_origin_devices = /dev/[\n", "allowed_origin_devices"},
		{"api_socket = /run/v/nbd/api.sock\nnbd_socket_dir = /run/v/nbd\n", "api_socket"},
		{"[metrics]\nlisten = localhost\n", "[metrics] listen"},
		{"[cache\nx=1\n", "config "},
	} {
		p := write(t, tc.body)
		_, _, err := Load(p)
		if err == nil {
			t.Errorf("%q: no error", tc.body)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%q: error %q does not name %q and the file", tc.body, err, tc.want)
		}
	}
	if _, _, err := Load("/nonexistent/vmthunder.conf"); err == nil || !strings.Contains(err.Error(), "/nonexistent/vmthunder.conf") {
		t.Errorf("missing file: %v", err)
	}
}

// api_group and nbd_group are separate; socket_group is only an alias of
// nbd_group (it never opens the API); the allowed_* lists are read.
func TestGroupsAndAllowedLists(t *testing.T) {
	c, warn, err := Load(write(t, `[DEFAULT]
state_dir = /srv/vmt
api_group = root
nbd_group = 0
socket_group = root
allowed_origin_dirs = /srv/images, /var/lib/glance/../images/
allowed_origin_devices = /dev/disk/by-path/*-iscsi-*, /dev/rbd*
allowed_cow_dirs = /srv/cow
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.APIGID != 0 || c.NBDGID != 0 || c.NBDGroup != "0" {
		t.Errorf("groups: api %q/%d nbd %q/%d", c.APIGroup, c.APIGID, c.NBDGroup, c.NBDGID)
	}
	if len(warn) != 1 || !strings.Contains(warn[0], "socket_group is deprecated and ignored") {
		t.Errorf("warnings: %q", warn)
	}
	if strings.Join(c.AllowedOriginDirs, ",") != "/srv/images,/var/lib/images" ||
		strings.Join(c.AllowedOriginDevices, ",") != "/dev/disk/by-path/*-iscsi-*,/dev/rbd*" ||
		strings.Join(c.AllowedCowDirs, ",") != "/srv/cow" {
		t.Errorf("lists: %q %q %q", c.AllowedOriginDirs, c.AllowedOriginDevices, c.AllowedCowDirs)
	}
	// An empty value is an empty list: no local origin devices at all.
	c, _, err = Load(write(t, "allowed_origin_devices =\nsocket_group = root\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.AllowedOriginDevices) != 0 || c.APIGID != -1 || c.NBDGID != 0 {
		t.Errorf("empty devices list %q, api gid %d (socket_group must not open the API), nbd gid %d", c.AllowedOriginDevices, c.APIGID, c.NBDGID)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"256K": 256 << 10, "20G": 20 << 30, "1.5T": 3 << 39, "4096": 4096, "64MiB": 64 << 20, " 2m ": 2 << 20} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "K", "-1G", "12Q", "1e30G"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q): no error", in)
		}
	}
}

// A size that is not a number is refused, whatever ParseFloat accepts.
func TestParseSizeNaN(t *testing.T) {
	for _, s := range []string{"NaN", "nan", "NaNK", "+Inf", "infinity"} {
		if n, err := ParseSize(s); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", s, n)
		}
	}
	p := write(t, "[cache]\nsize_budget = NaN\n")
	if c, _, err := Load(p); err == nil {
		t.Errorf("size_budget = NaN accepted: budget %d", c.CacheBudget)
	}
}
