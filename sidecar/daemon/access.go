package daemon

// Trust boundaries. The daemon runs as root. Whoever can connect to the API
// socket (root and api_group: nova-compute, cinder) can make it open
// files and create COW stores, and whoever can connect to an NBD socket
// (nbd_group: QEMU) reads and writes what it exports. So the API only
// exports what the config allows:
//
//   - a local origin file must resolve (symlinks and ".." followed) to a
//     regular file inside allowed_origin_dirs, and a local block device
//     must be named by a path matching an allowed_origin_devices glob;
//   - a COW store must be inside allowed_cow_dirs, with no symlink below
//     that directory (store, bitmap or directories in between);
//   - iSCSI origins (iscsi:// URLs, connection_info) are not local paths
//     and are always allowed.
//
// Check and open are two steps: the stack opens the origin and the store by
// path after checkAccess has looked at it. Rather than handing file
// descriptors down the stack, the check also refuses a path unless every
// directory the kernel walks to reach it (including those of symlinks it
// follows) can be changed only by root: owned by root and not writable by
// group or others, or sticky with the entry owned by root. Then nobody but
// root can rename, replace or re-point anything on the path between the
// check and the open, so the open reaches what was checked. A directory
// another user can write (nova's instances directory, say) is refused with
// a message saying so.

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/internal/unixsock"
	"github.com/vmthunder/vmthunder/sidecar/origin"
)

// checkAccess refuses (403 forbidden) a record whose local origin or COW
// store is outside what the config allows. open() calls it first, so both
// a create and the re-creation of a persisted export at restart are
// checked.
func (d *Daemon) checkAccess(r Record) error {
	if r.Origin != "" && r.ConnectionInfo == nil {
		p, err := (origin.Spec{URL: r.Origin}).Parse()
		if err != nil {
			return err
		}
		if p.Kind == origin.KindPath {
			if err := d.checkOrigin(p.Path); err != nil {
				return err
			}
		}
	}
	if r.CowPath != "" {
		if _, err := d.checkCow(r.CowPath); err != nil {
			return err
		}
	}
	return nil
}

func forbidden(format string, a ...any) error {
	return api.Errorf(http.StatusForbidden, api.CodeForbidden, format, a...)
}

// configName is the config file for messages.
func (d *Daemon) configName() string {
	if d.cfg.File != "" {
		return d.cfg.File
	}
	return "the daemon's config"
}

func listOrNone(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ", ")
}

// under says whether p is inside dir (both absolute and clean), not dir
// itself.
func under(p, dir string) bool {
	if dir == "/" {
		return p != "/"
	}
	return strings.HasPrefix(p, dir+"/")
}

// checkOrigin checks a local origin path (absolute and clean, as
// origin.Spec.Parse makes it, which is what the stack opens).
func (d *Daemon) checkOrigin(p string) error {
	var dir, glob string
	for _, a := range d.cfg.AllowedOriginDirs {
		if under(p, filepath.Clean(a)) {
			dir = a
			break
		}
	}
	for _, g := range d.cfg.AllowedOriginDevices {
		if ok, _ := filepath.Match(g, p); ok {
			glob = g
			break
		}
	}
	// Outside every allowed place: refused before the file system is
	// touched, so the API is no oracle for which root-only files exist.
	if dir == "" && glob == "" {
		return forbidden("origin %s is not in allowed_origin_dirs (%s) and matches no allowed_origin_devices pattern (%s): "+
			"to export it, add its directory to allowed_origin_dirs or a pattern to allowed_origin_devices in %s",
			p, listOrNone(d.cfg.AllowedOriginDirs), listOrNone(d.cfg.AllowedOriginDevices), d.configName())
	}
	resolved, st, err := resolveTrusted(p, false)
	if err != nil {
		var ue *untrustedError
		if errors.As(err, &ue) {
			return forbidden("origin %s: %v; the daemon opens it as root, so every directory on the way must be root's alone "+
				"(fix its owner or mode, or choose another place for allowed_origin_dirs)", p, ue)
		}
		return fmt.Errorf("origin %s: %w", p, err)
	}
	isBlock := st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0
	switch {
	case glob != "" && isBlock:
		return nil
	case isBlock:
		return forbidden("origin %s is a block device (%s) but matches no allowed_origin_devices pattern (%s); "+
			"allowed_origin_dirs admits regular files only", p, resolved, listOrNone(d.cfg.AllowedOriginDevices))
	case dir == "":
		return forbidden("origin %s matches allowed_origin_devices pattern %q but %s is not a block device", p, glob, resolved)
	case !st.Mode().IsRegular():
		return forbidden("origin %s (%s) is not a regular file; allowed_origin_dirs admits regular files only", p, resolved)
	}
	for _, a := range d.cfg.AllowedOriginDirs {
		ra, _, err := resolveTrusted(filepath.Clean(a), true)
		if err == nil && under(resolved, ra) {
			return nil
		}
	}
	return forbidden("origin %s resolves to %s, outside allowed_origin_dirs (%s): a symlink or \"..\" leads out of %s",
		p, resolved, listOrNone(d.cfg.AllowedOriginDirs), dir)
}

// checkCow checks a COW store path and returns what it names, however its
// allowed_cow_dirs entry is named. The directories on the way are walked
// without following symlinks and the store's files, if any, must be
// root's (cowdir.go): its directory may be someone else's (Nova's
// instances directory).
func (d *Daemon) checkCow(p string) (string, error) {
	if !filepath.IsAbs(p) {
		return "", api.BadRequest(api.CodeInvalid, "cow_path %q is not an absolute path", p)
	}
	dir, ident, err := d.cowDirFD(p, false)
	if err != nil {
		return "", err
	}
	if dir != nil {
		defer dir.Close()
		if err := checkCowEntries(dir, p); err != nil {
			return "", err
		}
	}
	return ident, nil
}

// cowAllowed says whether the daemon may create or remove a COW store at
// p under the current config.
func (d *Daemon) cowAllowed(p string) bool {
	_, err := d.checkCow(p)
	return err == nil
}

func mustRel(base, p string) string {
	r, err := filepath.Rel(base, p)
	if err != nil {
		return "\x00"
	}
	return r
}

// untrustedError: a directory on a path can be changed by someone other
// than root.
type untrustedError struct {
	dir string
	why string
}

func (e *untrustedError) Error() string { return fmt.Sprintf("directory %s %s", e.dir, e.why) }

func ownerOK(uid uint32) bool { return uid == 0 || int(uid) == os.Geteuid() }

// strictlyRoots: dir is owned by root and nobody else may write in it.
func strictlyRoots(dir string, st os.FileInfo) error {
	s := st.Sys().(*syscall.Stat_t)
	if !ownerOK(s.Uid) {
		return &untrustedError{dir, fmt.Sprintf("is owned by uid %d", s.Uid)}
	}
	if st.Mode().Perm()&0o022 != 0 {
		return &untrustedError{dir, fmt.Sprintf("is writable by group %d or others (mode %04o)", s.Gid, st.Mode().Perm())}
	}
	return nil
}

// entryTrusted: the entry (with Lstat entry) in dir cannot be renamed,
// removed or replaced by anyone but root.
func entryTrusted(dir string, dirSt, entry os.FileInfo) error {
	err := strictlyRoots(dir, dirSt)
	if err == nil {
		return nil
	}
	ds := dirSt.Sys().(*syscall.Stat_t)
	// Sticky (/tmp): only an entry's owner (or the directory's) may
	// rename or remove it.
	if ownerOK(ds.Uid) && dirSt.Mode()&os.ModeSticky != 0 && ownerOK(entry.Sys().(*syscall.Stat_t).Uid) {
		return nil
	}
	return err
}

// resolveTrusted resolves absolute path p as the kernel will when the
// daemon opens it: symlinks followed, ".." applied to what they lead to.
// It fails with *untrustedError if a directory walked through could be
// changed by someone other than root (see the comment at the top), and it
// refuses /proc (whose magic links do not mean what their text says).
// With missingOK a missing tail is appended as it is (a store not created
// yet) when the directory it would be created in is root's alone; the
// FileInfo is then nil. Otherwise it is the Lstat of the resolved path.
func resolveTrusted(p string, missingOK bool) (string, os.FileInfo, error) {
	if !filepath.IsAbs(p) {
		return "", nil, fmt.Errorf("%q is not an absolute path", p)
	}
	rootSt, err := os.Lstat("/")
	if err != nil {
		return "", nil, err
	}
	cur, curSt := "/", rootSt
	rest := strings.Split(p, "/")
	links := 0
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = filepath.Dir(cur)
			if curSt, err = os.Lstat(cur); err != nil {
				return "", nil, err
			}
			continue
		}
		next := filepath.Join(cur, c)
		if next == "/proc" {
			return "", nil, &untrustedError{"/proc", "holds magic links; no path through /proc is allowed"}
		}
		st, err := os.Lstat(next)
		if errors.Is(err, os.ErrNotExist) && missingOK {
			for _, x := range rest {
				if x == ".." {
					return "", nil, fmt.Errorf("%s: \"..\" after a missing directory", p)
				}
			}
			if err := strictlyRoots(cur, curSt); err != nil {
				return "", nil, err
			}
			return filepath.Join(append([]string{next}, rest...)...), nil, nil
		}
		if err != nil {
			return "", nil, err
		}
		if err := entryTrusted(cur, curSt, st); err != nil {
			return "", nil, err
		}
		if st.Mode()&os.ModeSymlink != 0 {
			if links++; links > 40 {
				return "", nil, &os.PathError{Op: "resolve", Path: p, Err: syscall.ELOOP}
			}
			target, err := os.Readlink(next)
			if err != nil {
				return "", nil, err
			}
			if filepath.IsAbs(target) {
				cur, curSt = "/", rootSt
			}
			rest = append(strings.Split(target, "/"), rest...)
			continue
		}
		if len(rest) > 0 && !st.IsDir() {
			// Only a problem if a non-empty component follows.
			more := false
			for _, x := range rest {
				more = more || (x != "" && x != ".")
			}
			if more {
				return "", nil, &os.PathError{Op: "resolve", Path: next, Err: syscall.ENOTDIR}
			}
		}
		cur, curSt = next, st
	}
	return cur, curSt, nil
}

// listenAPI listens on the API socket: root:api_group mode 0660, or root
// alone (0600) without api_group. nbd_group (QEMU) gets no access.
func (d *Daemon) listenAPI() (net.Listener, error) {
	ln, err := unixsock.Listen(d.cfg.APISocket, d.cfg.APIGID)
	if err != nil {
		return nil, fmt.Errorf("api_socket: %w", err)
	}
	if d.cfg.APIGID < 0 {
		if err := os.Chmod(d.cfg.APISocket, 0o600); err != nil {
			ln.Close()
			return nil, fmt.Errorf("api_socket: %w", err)
		}
	}
	return ln, nil
}

// prepareAPIDir makes the API socket's directory if it is missing:
// 0750 root:api_group (0700 without api_group), plus search permission
// for others when nbd_socket_dir is below it (QEMU must pass through to
// its sockets; it cannot list the directory, and the API socket's own
// mode keeps it out). An existing directory is kept, but refused when
// nbd_group or others may write in it (they could replace the socket).
func (d *Daemon) prepareAPIDir() error {
	dir := filepath.Dir(d.cfg.APISocket)
	st, err := os.Stat(dir)
	if err == nil {
		s := st.Sys().(*syscall.Stat_t)
		perm := st.Mode().Perm()
		switch {
		case perm&0o002 != 0 && st.Mode()&os.ModeSticky == 0:
			return fmt.Errorf("api_socket directory %s is writable by everyone (mode %04o)", dir, perm)
		case d.cfg.NBDGID > 0 && int(s.Gid) == d.cfg.NBDGID && d.cfg.NBDGID != d.cfg.APIGID && perm&0o020 != 0:
			return fmt.Errorf("api_socket directory %s is writable by nbd_group %s: QEMU could replace the API socket", dir, d.cfg.NBDGroup)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("api_socket directory: %w", err)
	}
	mode := os.FileMode(0o700)
	if d.cfg.APIGID >= 0 {
		mode = 0o750
	}
	if under(filepath.Clean(d.cfg.NBDSocketDir), filepath.Clean(dir)) {
		mode |= 0o011
	}
	if err := os.MkdirAll(dir, mode); err != nil {
		return fmt.Errorf("api_socket directory: %w", err)
	}
	if d.cfg.APIGID >= 0 {
		if err := os.Chown(dir, -1, d.cfg.APIGID); err != nil {
			return fmt.Errorf("api_socket directory: %w", err)
		}
	}
	if err := os.Chmod(dir, mode); err != nil { // the umask may have taken bits
		return fmt.Errorf("api_socket directory: %w", err)
	}
	return nil
}
