package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// ExportProc is one `vmthunder export` process serving one device on a
// unix socket, the stand-in for a daemon export.
type ExportProc struct {
	Socket string
	Name   string
	args   []string
	bin    string
	log    string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	out  *bytes.Buffer
}

// ExportOptions are the flags of one export.
type ExportOptions struct {
	Cache        string // --cache
	COW          string // --cow
	WriteThrough bool
	ReadOnly     bool
}

// StartExport runs `vmthunder export` for source and waits for its socket.
func StartExport(bin, socket, name, source string, o ExportOptions) (*ExportProc, error) {
	args := []string{"export", "--socket", socket, "--name", name}
	if o.Cache != "" {
		args = append(args, "--cache", o.Cache)
	}
	if o.COW != "" {
		args = append(args, "--cow", o.COW)
	}
	if o.WriteThrough {
		args = append(args, "--write-through")
	}
	if o.ReadOnly {
		args = append(args, "--readonly")
	}
	args = append(args, source)
	e := &ExportProc{Socket: socket, Name: name, args: args, bin: bin, log: socket + ".log"}
	return e, e.Start()
}

// Start (re)starts the process on the same socket, cache and store.
func (e *ExportProc) Start() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.out = &bytes.Buffer{}
	logf, err := os.OpenFile(e.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(e.bin, e.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", e.bin, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	e.cmd, e.done = cmd, done
	if err := waitSocket(e.Socket, done, 60*time.Second); err != nil {
		cmd.Process.Kill()
		<-done
		b, _ := os.ReadFile(e.log)
		return fmt.Errorf("vmthunder %v: %w; log:\n%s", e.args, err, tail(string(b), 20))
	}
	return shareSocket(e.Socket)
}

// waitSocket waits until a unix socket accepts connections.
func waitSocket(path string, exited <-chan struct{}, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("exited before its socket was ready")
		default:
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("socket %s not ready after %v", path, d)
}

// shareSocket gives the socket to QEMU's group: the sidecar makes it 0660.
func shareSocket(path string) error {
	gid, err := qemuGID()
	if err != nil {
		return err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && (int(st.Gid) == gid || fi.Mode().Perm()&0o006 == 0o006) {
		return nil
	}
	return os.Chown(path, -1, gid)
}

// Kill ends the process at once (SIGKILL), as a crash would.
func (e *ExportProc) Kill() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cmd != nil {
		e.cmd.Process.Kill()
		<-e.done
		e.cmd = nil
	}
}

// Stop asks the process to finish (SIGTERM: it flushes and closes its
// stores) and waits up to 30 s.
func (e *ExportProc) Stop() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cmd == nil {
		return nil
	}
	e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(30 * time.Second):
		e.cmd.Process.Kill()
		<-e.done
		e.cmd = nil
		return errors.New("export did not stop within 30 s of SIGTERM")
	}
	err := e.cmd.ProcessState
	e.cmd = nil
	if !err.Success() {
		b, _ := os.ReadFile(e.log)
		return fmt.Errorf("export exited with %v; log:\n%s", err, tail(string(b), 20))
	}
	return nil
}
