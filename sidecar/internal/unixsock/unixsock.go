// Package unixsock listens on the unix sockets QEMU connects to, the same
// way for the daemon and for `vmthunder export`.
package unixsock

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"time"
)

// ErrInUse: a server is already answering on the socket path.
var ErrInUse = errors.New("in use by a running server")

// MaxPath is the longest path a unix socket can have.
const MaxPath = 107

// Listen listens at path, mode 0660, group gid (-1: the process's). A
// stale socket left by a killed server is replaced; a live one is not
// (its clients, QEMU reconnecting, would get another disk), nor is any
// other file.
func Listen(path string, gid int) (net.Listener, error) {
	if len(path) > MaxPath {
		return nil, fmt.Errorf("socket path %s is longer than %d bytes", path, MaxPath)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("socket %s: %w", path, ErrInUse)
		}
		os.Remove(path)
	}
	// The socket file is created with the umask's mode; connecting needs
	// write permission, so until the chmod below only its owner can connect.
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("chown socket %s: %w", path, err)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", path, err)
	}
	return ln, nil
}
