package e2e

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vmthunder/vmthunder/internal/testbin"
)

// Meter is a TCP proxy on loopback in front of an iSCSI portal. It counts
// the bytes the target sends, which is the honest "bytes from the origin"
// for any initiator (the sidecar's libiscsi or QEMU's own driver) without
// trusting either side's counters.
type Meter struct {
	Addr   string // host:port initiators connect to
	target string
	l      net.Listener
	down   atomic.Int64 // target -> initiator
	up     atomic.Int64 // initiator -> target
	wg     sync.WaitGroup
	mu     sync.Mutex
	open   map[net.Conn]bool
	closed bool
}

// NewMeter starts a meter forwarding to target (host:port).
func NewMeter(target string) (*Meter, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	m := &Meter{Addr: l.Addr().String(), target: target, l: l, open: map[net.Conn]bool{}}
	go m.accept()
	return m, nil
}

// Port is the meter's TCP port.
func (m *Meter) Port() int { return m.l.Addr().(*net.TCPAddr).Port }

// Sent is the bytes the target has sent through the meter so far.
func (m *Meter) Sent() int64 { return m.down.Load() }

func (m *Meter) accept() {
	for {
		c, err := m.l.Accept()
		if err != nil {
			return
		}
		t, err := net.Dial("tcp", m.target)
		if err != nil {
			c.Close()
			continue
		}
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			c.Close()
			t.Close()
			return
		}
		m.open[c], m.open[t] = true, true
		m.mu.Unlock()
		m.wg.Add(2)
		go m.pipe(t, c, &m.down)
		go m.pipe(c, t, &m.up)
	}
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (m *Meter) pipe(from, to net.Conn, n *atomic.Int64) {
	defer m.wg.Done()
	io.Copy(countingWriter{to, n}, from)
	// One side ended: end both, as the initiator or target would see it.
	from.Close()
	to.Close()
	m.mu.Lock()
	delete(m.open, from)
	delete(m.open, to)
	m.mu.Unlock()
}

// Close stops the meter and its connections.
func (m *Meter) Close() {
	m.mu.Lock()
	m.closed = true
	for c := range m.open {
		c.Close()
	}
	m.mu.Unlock()
	m.l.Close()
	m.wg.Wait()
}

// Origin is a tgtd target serving an image as LUN 1, behind a Meter. The
// target is run by tgtup (package sidecar/internal/tgt, which tests
// outside sidecar/ may not import) as a child process.
type Origin struct {
	IQN    string
	LUN    int
	Portal string // the real portal, host:port
	Meter  *Meter
	File   string // the LUN's backing file

	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
}

// StartOrigin serves a sparse copy of image (so guests' write-through
// writes never touch the original) from a private tgtd.
func StartOrigin(image, dir string) (*Origin, error) {
	tgtup, err := testbin.Build("./sidecar/internal/tgt/tgtup")
	if err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "lun.img")
	if out, err := exec.Command("cp", "--sparse=always", image, file).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("copy image for the LUN: %v: %s", err, out)
	}
	o := &Origin{File: file, done: make(chan struct{})}
	o.cmd = exec.Command(tgtup, "-file", file, "-dir", dir, "-stdin")
	o.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	var stderr bytes.Buffer
	o.cmd.Stderr = &stderr
	stdout, err := o.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if o.stdin, err = o.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := o.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start tgtup: %w", err)
	}
	go func() { o.cmd.Wait(); close(o.done) }()
	vars := map[string]string{}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		vars[k] = strings.Trim(v, "'")
		if k == "TGT_READY" {
			break
		}
	}
	if vars["TGT_READY"] != "1" {
		o.stdin.Close()
		<-o.done
		return nil, fmt.Errorf("tgtup did not start a target: %s", stderr.String())
	}
	go io.Copy(io.Discard, stdout)
	o.IQN = vars["TGT_IQN"]
	o.LUN, _ = strconv.Atoi(vars["TGT_LUN"])
	o.Portal = strings.Fields(vars["TGT_PORTALS"])[0]
	if o.Meter, err = NewMeter(o.Portal); err != nil {
		o.Stop()
		return nil, err
	}
	return o, nil
}

// URL is the iscsi:// URL of the LUN through the meter.
func (o *Origin) URL() string {
	return fmt.Sprintf("iscsi://%s/%s/%d", o.Meter.Addr, o.IQN, o.LUN)
}

// Stop stops the meter and the target.
func (o *Origin) Stop() {
	if o.Meter != nil {
		o.Meter.Close()
	}
	o.stdin.Close()
	select {
	case <-o.done:
	case <-time.After(15 * time.Second):
		o.cmd.Process.Kill()
		<-o.done
	}
}

// qemuGID is the group QEMU runs in; sockets it must open are given to it.
func qemuGID() (int, error) {
	out, err := exec.Command("id", "-g", "libvirt-qemu").Output()
	if err != nil {
		return 0, errors.New("no user libvirt-qemu (Debian package libvirt-daemon-system)")
	}
	return strconv.Atoi(string(trimNL(out)))
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// MakeShared makes dir (and the path down to it) traversable for QEMU.
func MakeShared(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.Chmod(dir, 0o755)
}
