package bulk

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
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

// Origin is tgtd serving the guest image as LUN 1 in the origin's
// namespace, reached at OriginIP:3260 through a relay (in the same
// namespace) that delays what the target sends by the run's delay (this
// kernel has no sch_netem) and counts it: Sent is the origin's bytes.
type Origin struct {
	Host  *Host
	IQN   string
	LUN   int
	File  string // the LUN's backing file (a sparse copy of the image)
	Addr  string // OriginIP:3260, the relay
	delay time.Duration

	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
	ln    net.Listener
	sent  atomic.Int64
	mu    sync.Mutex
	conns map[net.Conn]bool
}

// StartOrigin serves a sparse copy of image from tgtd inside host's
// namespace.
func StartOrigin(host *Host, image, dir string, delay time.Duration) (*Origin, error) {
	tgtup, err := testbin.Build("./sidecar/internal/tgt/tgtup")
	if err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "lun.img")
	if out, err := exec.Command("cp", "--sparse=always", image, file).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("copy image for the LUN: %v: %s", err, out)
	}
	o := &Origin{Host: host, File: file, delay: delay, done: make(chan struct{}), conns: map[net.Conn]bool{}}
	o.cmd = host.Exec(tgtup, "-file", file, "-dir", dir, "-stdin")
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
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			vars[k] = strings.Trim(v, "'")
			if k == "TGT_READY" {
				break
			}
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
	portal := strings.Fields(vars["TGT_PORTALS"])[0]
	o.Addr = net.JoinHostPort(host.IP, "3260")
	if err := host.Do(func() (err error) { o.ln, err = net.Listen("tcp", o.Addr); return }); err != nil {
		o.Stop()
		return nil, err
	}
	go o.accept(portal)
	return o, nil
}

// URL is the LUN's iscsi:// URL at the relay.
func (o *Origin) URL() string { return fmt.Sprintf("iscsi://%s/%s/%d", o.Addr, o.IQN, o.LUN) }

// Sent is the bytes the target has sent so far, through the relay.
func (o *Origin) Sent() int64 { return o.sent.Load() }

func (o *Origin) accept(portal string) {
	for {
		c, err := o.ln.Accept()
		if err != nil {
			return
		}
		var t net.Conn
		if err := o.Host.Do(func() (err error) { t, err = net.Dial("tcp", portal); return }); err != nil {
			c.Close()
			continue
		}
		o.mu.Lock()
		o.conns[c], o.conns[t] = true, true
		o.mu.Unlock()
		go func() { io.Copy(t, c); t.Close(); c.Close() }()
		go func() {
			delayCopy(c, t, o.delay, &o.sent)
			c.Close()
			t.Close()
			o.mu.Lock()
			delete(o.conns, c)
			delete(o.conns, t)
			o.mu.Unlock()
		}()
	}
}

// delayCopy copies src to dst, each piece delay after it was read: a
// delay line, the rate stays the link's.
func delayCopy(dst io.Writer, src io.Reader, delay time.Duration, n *atomic.Int64) {
	type piece struct {
		at time.Time
		b  []byte
	}
	q := make(chan piece, 1024)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			k, err := src.Read(buf)
			if k > 0 {
				q <- piece{time.Now().Add(delay), buf[:k]}
			}
			if err != nil {
				return
			}
		}
	}()
	for p := range q {
		time.Sleep(time.Until(p.at))
		if _, err := dst.Write(p.b); err != nil {
			for range q {
			}
			return
		}
		n.Add(int64(len(p.b)))
	}
}

// Stop closes the relay and stops the target.
func (o *Origin) Stop() {
	if o.ln != nil {
		o.ln.Close()
	}
	o.mu.Lock()
	for c := range o.conns {
		c.Close()
	}
	o.mu.Unlock()
	o.stdin.Close()
	select {
	case <-o.done:
	case <-time.After(15 * time.Second):
		o.cmd.Process.Kill()
		<-o.done
	}
}
