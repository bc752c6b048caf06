package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Meter is a TCP proxy on loopback in front of an iSCSI portal. It counts
// the bytes the target sends, which is the honest "bytes from the origin"
// for any initiator (the sidecar's libiscsi or QEMU's own driver) without
// trusting either side's counters.
type Meter struct {
	Addr   string // host:port initiators connect to
	dial   func() (net.Conn, error)
	delay  time.Duration
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
	return NewRelay(l, func() (net.Conn, error) { return net.Dial("tcp", target) }, 0), nil
}

// NewRelay is a meter on l that reaches the target with dial and holds
// back what the target sends by delay (see DelayCopy).
func NewRelay(l net.Listener, dial func() (net.Conn, error), delay time.Duration) *Meter {
	m := &Meter{Addr: l.Addr().String(), dial: dial, delay: delay, l: l, open: map[net.Conn]bool{}}
	go m.accept()
	return m
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
		// Dial per connection, not in this loop: a wave's initiators
		// connect at once, and one slow dial must not hold the others'
		// accepts (their logins time out).
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			c.Close()
			return
		}
		m.wg.Add(1) // under mu, so never after Close's Wait began
		m.mu.Unlock()
		go m.connect(c)
	}
}

func (m *Meter) connect(c net.Conn) {
	defer m.wg.Done()
	t, err := m.dial()
	if err != nil {
		c.Close()
		return
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
	go m.pipe(t, c, m.delay, &m.down)
	go m.pipe(c, t, 0, &m.up)
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

func (m *Meter) pipe(from, to net.Conn, delay time.Duration, n *atomic.Int64) {
	defer m.wg.Done()
	if delay > 0 {
		DelayCopy(to, from, delay, n)
	} else {
		io.Copy(countingWriter{to, n}, from)
	}
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

// Origin is a tgtd target serving an image as LUN 1, behind a Meter.
type Origin struct {
	*Target
	Meter *Meter
}

// StartOrigin serves a sparse copy of image from a private tgtd.
func StartOrigin(image, dir string) (*Origin, error) {
	t, err := StartTarget(image, dir, nil)
	if err != nil {
		return nil, err
	}
	o := &Origin{Target: t}
	if o.Meter, err = NewMeter(t.Portal); err != nil {
		t.Stop()
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
	o.Meter.Close()
	o.Target.Stop()
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
