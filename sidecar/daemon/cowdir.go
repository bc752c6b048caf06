package daemon

// COW stores may live in directories root does not own: Nova's instances
// directory (nova:nova), listed in allowed_cow_dirs, so an instance's disk
// moves with it. Whoever owns such a directory can rename, replace or
// re-point anything in it at any moment, so the daemon never resolves a
// path through it twice. It walks from the allowed_cow_dirs entry one
// component at a time (openat, O_NOFOLLOW|O_DIRECTORY), holds the store's
// directory open, and hands the stack /proc/self/fd/N/NAME, which the
// kernel resolves through that very directory. In it, every file is
// opened with O_NOFOLLOW (layer/cow, pbitmap), a new store is created
// with O_EXCL, and an existing store or bitmap is used only if it is a
// regular file owned by root with one link: a symlink, a hard link or a
// file someone else made is refused. Stores are root:api_group 0640, so
// nova can read (migrate) them and not write them.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// cowEntries are the files of the store NAME: the store, its bitmap, and
// the bitmap's temporary file while it is made.
func cowEntries(name string) []string {
	return []string{name, name + ".bitmap", name + ".bitmap.tmp"}
}

// cowDirFD opens the directory of cow_path p (inside allowed_cow_dirs) by
// walking to it without following symlinks; create makes missing
// directories (0700 root). ident names the store whatever name its
// allowed directory is given by (for comparing exports' stores). With
// create false a missing directory is no error: dir is then nil.
func (d *Daemon) cowDirFD(p string, create bool) (dir *os.File, ident string, err error) {
	c := filepath.Clean(p)
	var allowed string
	for _, a := range d.cfg.AllowedCowDirs {
		if under(c, filepath.Clean(a)) {
			allowed = filepath.Clean(a)
			break
		}
	}
	if allowed == "" {
		return nil, "", forbidden("cow_path %s is not in allowed_cow_dirs (%s): choose a path there, or add its directory to allowed_cow_dirs in %s",
			p, listOrNone(d.cfg.AllowedCowDirs), d.configName())
	}
	// The allowed directory itself: through root's own directories its
	// resolved name is stable; else (say /var/lib/nova is nova's) it is
	// walked like what is below it, and may hold no symlink.
	var fd int
	base := allowed
	if ra, _, rerr := resolveTrusted(allowed, false); rerr == nil {
		base = ra
		fd, err = unix.Open(ra, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	} else {
		var ue *untrustedError
		if !errors.As(rerr, &ue) {
			return nil, "", forbidden("cow_path %s: allowed_cow_dirs entry %s: %v", p, allowed, rerr)
		}
		fd, err = walkNoFollow(unix.AT_FDCWD, "/", strings.Split(strings.TrimPrefix(allowed, "/"), "/"), false)
	}
	if err != nil {
		return nil, "", cowWalkError(p, allowed, err)
	}
	rel := mustRel(allowed, filepath.Dir(c))
	ident = filepath.Join(base, rel, filepath.Base(c))
	if rel != "." {
		fd, err = walkNoFollow(fd, allowed, strings.Split(rel, "/"), create)
		if errors.Is(err, unix.ENOENT) && !create {
			return nil, ident, nil
		}
		if err != nil {
			return nil, "", cowWalkError(p, allowed, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, "", err
	}
	if st.Mode&0o002 != 0 && st.Mode&unix.S_ISVTX == 0 {
		unix.Close(fd)
		return nil, "", forbidden("cow_path %s: directory %s is writable by everyone (mode %04o)", p, filepath.Dir(c), st.Mode&0o7777)
	}
	// Someone else may add entries there: a hard link they made to a root
	// file, between the daemon's check and its open, would be written.
	// The kernel forbids such links only with protected_hardlinks.
	if (st.Uid != 0 || st.Mode&0o022 != 0) && !protectedHardlinks() {
		unix.Close(fd)
		return nil, "", forbidden("cow_path %s: directory %s can be written by uid %d or its group, and fs.protected_hardlinks is off: "+
			"another user could link a root file there (set sysctl fs.protected_hardlinks=1)", p, filepath.Dir(c), st.Uid)
	}
	return os.NewFile(uintptr(fd), filepath.Dir(c)), ident, nil
}

// protectedHardlinks says whether users may hard-link only files they own
// or can read and write (fs.protected_hardlinks = 1, Debian's default).
func protectedHardlinks() bool {
	b, err := os.ReadFile("/proc/sys/fs/protected_hardlinks")
	return err == nil && strings.TrimSpace(string(b)) == "1"
}

// walkNoFollow opens the components one by one below dirfd (closing
// dirfd), refusing symlinks; create makes missing ones.
func walkNoFollow(dirfd int, from string, comps []string, create bool) (int, error) {
	cur := dirfd
	closeCur := func() {
		if cur != unix.AT_FDCWD {
			unix.Close(cur)
		}
	}
	if cur == unix.AT_FDCWD {
		var err error
		if cur, err = unix.Open(from, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
			return -1, err
		}
	}
	for _, comp := range comps {
		if comp == "" || comp == "." {
			continue
		}
		if comp == ".." {
			closeCur()
			return -1, fmt.Errorf("%q in the path", "..")
		}
		next, err := unix.Openat(cur, comp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) && create {
			if err = unix.Mkdirat(cur, comp, 0o700); err == nil || errors.Is(err, unix.EEXIST) {
				next, err = unix.Openat(cur, comp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			}
		}
		closeCur()
		if err != nil {
			return -1, &os.PathError{Op: "walk", Path: comp, Err: err}
		}
		cur = next
	}
	return cur, nil
}

func cowWalkError(p, allowed string, err error) error {
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		return forbidden("cow_path %s: a component below / is a symlink or not a directory: the daemon follows no symlinks inside allowed_cow_dirs (%s)", p, allowed)
	}
	return forbidden("cow_path %s: %v", p, err)
}

// checkCowEntries refuses a store whose files exist but are not the
// daemon's: a symlink, a hard link, a file owned by someone else, or not a
// regular file.
func checkCowEntries(dir *os.File, p string) error {
	for _, name := range cowEntries(filepath.Base(p)) {
		var st unix.Stat_t
		err := unix.Fstatat(int(dir.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return fmt.Errorf("cow_path %s: %s: %w", p, name, err)
		}
		if err := storeFileOK(p, name, &st); err != nil {
			return err
		}
	}
	return nil
}

func storeFileOK(p, name string, st *unix.Stat_t) error {
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return forbidden("cow_path %s: %s is a symlink: the daemon follows no symlinks inside allowed_cow_dirs", p, name)
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return forbidden("cow_path %s exists and is not a regular file (%s)", p, name)
	case st.Uid != 0 && int(st.Uid) != os.Geteuid():
		return forbidden("cow_path %s: %s is owned by uid %d, not root: not a store the daemon made", p, name, st.Uid)
	case st.Nlink != 1:
		return forbidden("cow_path %s: %s has %d links: not a store the daemon made", p, name, st.Nlink)
	}
	return nil
}

// renamedErr shows an error about the store's descriptor path with the
// cow_path the caller gave; errors.Is and As still see the cause.
type renamedErr struct {
	err      error
	from, to string
}

func (e renamedErr) Error() string { return strings.ReplaceAll(e.err.Error(), e.from, e.to) }
func (e renamedErr) Unwrap() error { return e.err }

// procPath names NAME in dir through the daemon's open descriptor.
func procPath(dir *os.File, name string) string {
	return fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), name)
}

// prepareCow opens the directory of cow_path p (creating missing
// directories), checks the store's files, and creates a missing store
// (O_EXCL, root:api_group 0640). The caller closes dir once the stack has
// opened the store.
func (d *Daemon) prepareCow(p string) (*os.File, error) {
	dir, _, err := d.cowDirFD(p, true)
	if err != nil {
		return nil, err
	}
	if err := checkCowEntries(dir, p); err != nil {
		dir.Close()
		return nil, err
	}
	fd, err := unix.Openat(int(dir.Fd()), filepath.Base(p), unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err == nil {
		err = d.ownStoreFile(fd)
		unix.Close(fd)
	}
	if err != nil && !errors.Is(err, unix.EEXIST) {
		dir.Close()
		return nil, fmt.Errorf("cow_path %s: %w", p, err)
	}
	return dir, nil
}

// ownStoreFile makes a store file root:api_group 0640 (root:root 0600
// without api_group).
func (d *Daemon) ownStoreFile(fd int) error {
	gid, mode := 0, uint32(0o600)
	if d.cfg.APIGID >= 0 {
		gid, mode = d.cfg.APIGID, 0o640
	}
	if err := unix.Fchown(fd, 0, gid); err != nil {
		return err
	}
	return unix.Fchmod(fd, mode)
}

// ownCowFiles gives the store and bitmap the daemon just opened their
// owner and mode, checking each again (O_NOFOLLOW, root's, one link).
func (d *Daemon) ownCowFiles(dir *os.File, p string) error {
	for _, name := range cowEntries(filepath.Base(p))[:2] {
		fd, err := unix.Openat(int(dir.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("cow_path %s: %s: %w", p, name, err)
		}
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		if err == nil {
			err = storeFileOK(p, name, &st)
		}
		if err == nil {
			err = d.ownStoreFile(fd)
		}
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

// removeCow deletes the store at cow_path p through its directory's
// descriptor (a directory swapped meanwhile cannot redirect the unlinks).
func (d *Daemon) removeCow(p string, remove func(string) error) error {
	dir, _, err := d.cowDirFD(p, false)
	if err != nil {
		return err
	}
	if dir == nil {
		return nil // its directory is gone, and the store with it
	}
	defer dir.Close()
	return remove(procPath(dir, filepath.Base(p)))
}
