// Package tgt runs private tgtd instances (the userspace iSCSI target that
// Cinder's LVM backend uses) for tests and demos: each target gets its own
// control port, loopback portals on free ports and a file-backed LUN, so
// several engineers' test runs on one host never share a daemon.
package tgt

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Options describes the target to start. The zero value is a 64 MiB LUN
// of random bytes on one portal without CHAP.
type Options struct {
	// BackingFile is served as LUN 1. Empty: a new file of Size bytes in
	// Dir, filled with random bytes (so byte-exact checks mean something).
	BackingFile string
	Size        int64  // default 64 MiB
	Dir         string // for the backing file and logs; default a temp dir
	Zero        bool   // leave a new backing file sparse (zeroes) instead of random
	// IQN of the target; default iqn.2026-11.org.vmthunder.test:<random>.
	IQN string
	// Portals is the number of loopback portals (default 1). Each portal is
	// served by its own tgtd over the same backing file, so KillPortal
	// drops one path the way a failed storage controller would.
	Portals int
	// BlockSize is the LUN's logical block size (default 512).
	BlockSize int
	// CHAPUser/CHAPPassword add an incoming CHAP account bound to the
	// target: initiators must log in with them.
	CHAPUser, CHAPPassword string
	// ReadOnly exports the LUN read-only.
	ReadOnly bool
	// Thin makes the LUN thin provisioned: it reports LBPME and UNMAP
	// punches holes in the backing file.
	Thin bool
}

// Target is a running target.
type Target struct {
	IQN         string
	LUN         int
	BackingFile string
	Portals     []string // host:port, one per tgtd
	BlockSize   int
	User, Pass  string

	dir   string
	procs []*daemon
	tmp   bool
}

type daemon struct {
	cmd     *exec.Cmd
	control int
	portal  string
	log     *bytes.Buffer
	done    chan struct{}
	mu      sync.Mutex
	killed  bool
}

// Start starts a target and stops it when the test ends. It fails the test
// if tgtd cannot be started.
func Start(t testing.TB, o Options) *Target {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	tg, err := StartE(o)
	if err != nil {
		t.Fatalf("tgt: %v", err)
	}
	t.Cleanup(tg.Stop)
	return tg
}

// StartE starts a target; the caller must Stop it.
func StartE(o Options) (*Target, error) {
	if _, err := exec.LookPath("tgtd"); err != nil {
		return nil, fmt.Errorf("%w (Debian package tgt): %v", ErrNoTgtd, err)
	}
	if o.Portals <= 0 {
		o.Portals = 1
	}
	if o.Size <= 0 {
		o.Size = 64 << 20
	}
	if o.BlockSize == 0 {
		o.BlockSize = 512
	}
	if o.IQN == "" {
		o.IQN = "iqn.2026-11.org.vmthunder.test:" + randHex(4)
	}
	tg := &Target{IQN: o.IQN, LUN: 1, BlockSize: o.BlockSize, User: o.CHAPUser, Pass: o.CHAPPassword}
	if o.Dir == "" {
		d, err := os.MkdirTemp("", "vmthunder-tgt-")
		if err != nil {
			return nil, err
		}
		o.Dir, tg.tmp = d, true
	}
	tg.dir = o.Dir
	tg.BackingFile = o.BackingFile
	if tg.BackingFile == "" {
		tg.BackingFile = filepath.Join(o.Dir, "lun1.img")
		if err := makeBacking(tg.BackingFile, o.Size, !o.Zero); err != nil {
			tg.Stop()
			return nil, err
		}
	}
	for i := 0; i < o.Portals; i++ {
		d, err := startDaemon(o.Dir, i)
		if err != nil {
			tg.Stop()
			return nil, err
		}
		tg.procs = append(tg.procs, d)
		tg.Portals = append(tg.Portals, d.portal)
		if err := d.setup(tg, o); err != nil {
			tg.Stop()
			return nil, err
		}
	}
	return tg, nil
}

func makeBacking(path string, size int64, random bool) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if !random {
		return f.Truncate(size)
	}
	// A cheap PRNG stream: crypto/rand at this volume is slow on a shared box.
	var seed [8]byte
	rand.Read(seed[:])
	buf := make([]byte, 1<<20)
	x := uint64(seed[0]) | uint64(seed[1])<<8 | uint64(seed[2])<<16 | uint64(seed[3])<<24 | 1
	for done := int64(0); done < size; {
		for i := 0; i+8 <= len(buf); i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			for k := 0; k < 8; k++ {
				buf[i+k] = byte(x >> (8 * k))
			}
		}
		n := min(int64(len(buf)), size-done)
		if _, err := f.Write(buf[:n]); err != nil {
			return err
		}
		done += n
	}
	return f.Close()
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startDaemon starts one tgtd on a free portal with a free control port.
// Both are raced for by other processes, so it retries a few times.
func startDaemon(dir string, idx int) (*daemon, error) {
	var last error
	for attempt := 0; attempt < 8; attempt++ {
		port, err := FreePort()
		if err != nil {
			return nil, err
		}
		// The control "port" (at most 32767) names a unix socket
		// /run/tgtd/socket.N guarded by a lock file; a random N keeps us
		// off other engineers' daemons.
		n, _ := rand.Int(rand.Reader, big.NewInt(12000))
		control := 20000 + int(n.Int64())
		if _, err := os.Stat(fmt.Sprintf("/run/tgtd/socket.%d.lock", control)); err == nil {
			continue
		}
		d := &daemon{control: control, portal: fmt.Sprintf("127.0.0.1:%d", port), log: &bytes.Buffer{}, done: make(chan struct{})}
		logf, err := os.Create(filepath.Join(dir, fmt.Sprintf("tgtd-%d.log", idx)))
		if err != nil {
			return nil, err
		}
		d.cmd = exec.Command("tgtd", "-f", "-C", strconv.Itoa(control), "--iscsi", "portal="+d.portal)
		d.cmd.Stdout = io.MultiWriter(logf, d.log)
		d.cmd.Stderr = d.cmd.Stdout
		// Its own process group, so a test's signal to us does not reach it
		// first, and Setpdeathsig so a crashed test leaves no daemon behind.
		d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		if err := d.cmd.Start(); err != nil {
			logf.Close()
			return nil, fmt.Errorf("start tgtd: %w", err)
		}
		go func() { d.cmd.Wait(); logf.Close(); close(d.done) }()
		if err := d.waitReady(); err != nil {
			d.kill()
			last = err
			continue
		}
		return d, nil
	}
	return nil, fmt.Errorf("tgtd did not start after retries: %w", last)
}

// waitReady waits until the daemon answers on its control socket and
// listens on its portal.
func (d *daemon) waitReady() error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			return fmt.Errorf("tgtd exited: %s", strings.TrimSpace(d.log.String()))
		default:
		}
		if _, err := d.adm("--mode", "sys", "--op", "show"); err == nil {
			if c, err := net.DialTimeout("tcp", d.portal, time.Second); err == nil {
				c.Close()
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("tgtd on %s not ready after 10s: %s", d.portal, d.log.String())
}

func (d *daemon) adm(args ...string) (string, error) {
	full := append([]string{"-C", strconv.Itoa(d.control), "--lld", "iscsi"}, args...)
	out, err := exec.Command("tgtadm", full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("tgtadm %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func (d *daemon) setup(tg *Target, o Options) error {
	steps := [][]string{
		{"--mode", "target", "--op", "new", "--tid", "1", "-T", tg.IQN},
		{"--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", tg.BackingFile, "--blocksize", strconv.Itoa(o.BlockSize)},
		{"--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL"},
	}
	if o.ReadOnly {
		steps = append(steps, []string{"--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "1", "--params", "readonly=1"})
	}
	if o.Thin {
		steps = append(steps, []string{"--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "1", "--params", "thin_provisioning=1"})
	}
	if o.CHAPUser != "" {
		steps = append(steps,
			[]string{"--mode", "account", "--op", "new", "--user", o.CHAPUser, "--password", o.CHAPPassword},
			[]string{"--mode", "account", "--op", "bind", "--tid", "1", "--user", o.CHAPUser})
	}
	for _, s := range steps {
		if _, err := d.adm(s...); err != nil {
			return err
		}
	}
	return nil
}

func (d *daemon) kill() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.killed || d.cmd.Process == nil {
		return
	}
	d.killed = true
	d.cmd.Process.Kill() // tgtd ignores SIGTERM
	select {
	case <-d.done:
		// SIGKILL leaves the control socket and its lock file behind.
		os.Remove(fmt.Sprintf("/run/tgtd/socket.%d", d.control))
		os.Remove(fmt.Sprintf("/run/tgtd/socket.%d.lock", d.control))
	case <-time.After(10 * time.Second):
	}
}

// KillPortal kills the tgtd behind portal i (SIGKILL): its connections
// drop and it stops listening.
func (tg *Target) KillPortal(i int) { tg.procs[i].kill() }

// Signal sends sig to the tgtd behind portal i (SIGSTOP makes a portal
// that accepts TCP connections but never answers).
func (tg *Target) Signal(i int, sig os.Signal) error { return tg.procs[i].cmd.Process.Signal(sig) }

// Admin runs tgtadm against the daemon behind portal i, for tests that
// change the target at run time.
func (tg *Target) Admin(i int, args ...string) (string, error) { return tg.procs[i].adm(args...) }

// Stop kills every tgtd of the target and removes its temp dir if it made one.
func (tg *Target) Stop() {
	for _, d := range tg.procs {
		d.kill()
	}
	if tg.tmp {
		os.RemoveAll(tg.dir)
	}
}

// URL is the iscsi:// URL of portal i (with the CHAP credentials, if any),
// the form QEMU and libiscsi take.
func (tg *Target) URL(i int) string {
	u := "iscsi://"
	if tg.User != "" {
		u += tg.User + "%" + tg.Pass + "@"
	}
	return fmt.Sprintf("%s%s/%s/%d", u, tg.Portals[i], tg.IQN, tg.LUN)
}

// ConnectionInfo is the target as Cinder's connection_info "data" dict
// (multipath form when there are several portals).
func (tg *Target) ConnectionInfo() map[string]any {
	ci := map[string]any{
		"target_portal":     tg.Portals[0],
		"target_iqn":        tg.IQN,
		"target_lun":        tg.LUN,
		"target_discovered": false,
		"volume_id":         "vol-" + tg.IQN[strings.LastIndex(tg.IQN, ":")+1:],
	}
	if len(tg.Portals) > 1 {
		var iqns []any
		var luns []any
		var portals []any
		for _, p := range tg.Portals {
			portals = append(portals, p)
			iqns = append(iqns, tg.IQN)
			luns = append(luns, tg.LUN)
		}
		ci["target_portals"], ci["target_iqns"], ci["target_luns"] = portals, iqns, luns
	}
	if tg.User != "" {
		ci["auth_method"], ci["auth_username"], ci["auth_password"] = "CHAP", tg.User, tg.Pass
	}
	return ci
}

// ErrNoTgtd is returned when tgtd is not installed.
var ErrNoTgtd = errors.New("tgtd not installed")
