package iscsi

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/internal/tgt"
)

func openT(t *testing.T, s Spec) *Dev {
	t.Helper()
	d, err := Open(s)
	if err != nil {
		t.Fatalf("open %s: %v", s, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func specOf(tg *tgt.Target) Spec {
	s, err := ParseConnectionInfo(tg.ConnectionInfo())
	if err != nil {
		panic(err)
	}
	return s
}

// Reads at random offsets and sizes (aligned and not) match the backing file.
func TestReadByteExact(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 32 << 20})
	want, err := os.ReadFile(tg.BackingFile)
	if err != nil {
		t.Fatal(err)
	}
	d, err := OpenURL(tg.URL(0), true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != int64(len(want)) {
		t.Fatalf("size %d, backing file %d", d.Size(), len(want))
	}
	if c := d.Caps(); !c.MultiConn || !c.Flush || !c.ReadOnly {
		t.Fatalf("caps %+v", c)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 300; i++ {
		var off, n int64
		switch i % 3 {
		case 0: // aligned
			n = (rng.Int64N(256) + 1) * 512
			off = rng.Int64N(int64(len(want))/512-n/512) * 512
		case 1: // anything
			n = rng.Int64N(300000) + 1
			off = rng.Int64N(int64(len(want)) - n)
		default: // large, split over sessions
			n = rng.Int64N(6<<20) + 1
			off = rng.Int64N(int64(len(want)) - n)
		}
		got := make([]byte, n)
		if k, err := d.ReadAt(got, off); err != nil || k != int(n) {
			t.Fatalf("read %d at %d: %d, %v", n, off, k, err)
		}
		if !bytes.Equal(got, want[off:off+n]) {
			t.Fatalf("read %d at %d: bytes differ from the backing file", n, off)
		}
	}
	// Past the end: ErrOutOfRange, not a short read.
	if _, err := d.ReadAt(make([]byte, 1024), d.Size()-512); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("read past end: %v", err)
	}
	if _, err := d.WriteAt(make([]byte, 512), 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("write to read-only: %v", err)
	}
}

// Writes (aligned and not) and a flush land in the backing file.
func TestWriteFlush(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 8 << 20})
	d := openT(t, specOf(tg))
	model, err := os.ReadFile(tg.BackingFile)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 100; i++ {
		n := rng.Int64N(200000) + 1
		if i%2 == 0 {
			n = (n/512 + 1) * 512
		}
		off := rng.Int64N(int64(len(model)) - n)
		if i%2 == 0 {
			off = off / 512 * 512
		}
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if k, err := d.WriteAt(p, off); err != nil || k != len(p) {
			t.Fatalf("write %d at %d: %d %v", n, off, k, err)
		}
		copy(model[off:], p)
	}
	if err := d.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	got, err := os.ReadFile(tg.BackingFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("backing file differs from what was written")
	}
	back := make([]byte, len(model))
	if _, err := d.ReadAt(back, 0); err != nil || !bytes.Equal(back, model) {
		t.Fatalf("read back through the device: %v", err)
	}
	// A thick LUN has no UNMAP.
	if err := d.Trim(0, 4096); !errors.Is(err, blockdev.ErrUnsupported) {
		t.Fatalf("trim on a thick LUN: %v", err)
	}
}

// On a thin LUN, Trim unmaps: the blocks read back as zeroes.
func TestTrimThin(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 8 << 20, Thin: true})
	d := openT(t, specOf(tg))
	if !d.Caps().Trim {
		t.Fatalf("thin LUN without Trim cap: %+v", d.Caps())
	}
	if err := d.Trim(1<<20, 1<<20); err != nil {
		t.Fatalf("trim: %v", err)
	}
	got := make([]byte, 1<<20)
	if _, err := d.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("trimmed range does not read back as zeroes")
	}
}

func TestCHAP(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 4 << 20, CHAPUser: "vmthunder", CHAPPassword: "right-secret-12"})
	want, _ := os.ReadFile(tg.BackingFile)
	// Right secret, from the URL and from connection_info.
	d, err := OpenURL(tg.URL(0), true)
	if err != nil {
		t.Fatalf("right CHAP secret refused: %v", err)
	}
	got := make([]byte, 64<<10)
	if _, err := d.ReadAt(got, 4096); err != nil || !bytes.Equal(got, want[4096:4096+len(got)]) {
		t.Fatalf("read with CHAP: %v", err)
	}
	d.Close()
	openT(t, specOf(tg))

	s := specOf(tg)
	s.Password = "wrong-secret-12"
	_, err = Open(s)
	t.Logf("wrong secret: %v", err)
	if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "authentication") {
		t.Fatalf("wrong CHAP secret: want ErrAuth, got %v", err)
	}
	if strings.Contains(err.Error(), "wrong-secret") {
		t.Fatalf("error leaks the password: %v", err)
	}
	s.User, s.Password = "", ""
	if _, err := Open(s); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "no credentials") {
		t.Fatalf("no CHAP credentials: want ErrAuth naming it, got %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 4 << 20})
	fast := func(s Spec) Spec { s.Timeout = 2 * time.Second; return s }

	s := specOf(tg)
	s.Portals[0].IQN = "iqn.2026-11.org.vmthunder.test:nosuchtarget"
	_, err := Open(fast(s))
	t.Logf("unknown IQN: %v", err)
	if !errors.Is(err, ErrTargetNotFound) || !strings.Contains(err.Error(), "nosuchtarget") {
		t.Fatalf("unknown IQN: want ErrTargetNotFound, got %v", err)
	}

	s = specOf(tg)
	s.Portals[0].LUN = 7
	_, err = Open(fast(s))
	t.Logf("no such LUN: %v", err)
	if !errors.Is(err, ErrNoLUN) || !strings.Contains(err.Error(), "LUN 7") {
		t.Fatalf("no such LUN: want ErrNoLUN, got %v", err)
	}

	port, _ := tgt.FreePort()
	s = specOf(tg)
	s.Portals[0].Addr = "127.0.0.1:" + strconv.Itoa(port)
	_, err = Open(fast(s))
	t.Logf("closed port: %v", err)
	if !errors.Is(err, ErrUnreachable) || !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("closed port: want ErrUnreachable/ECONNREFUSED, got %v", err)
	}

	// A stopped tgtd accepts TCP (the kernel does) but never answers.
	tg2 := tgt.Start(t, tgt.Options{Size: 1 << 20})
	if err := tg2.Signal(0, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg2.Signal(0, syscall.SIGCONT) })
	s = specOf(tg2)
	s.Timeout = time.Second
	start := time.Now()
	_, err = Open(s)
	t.Logf("silent portal: %v", err)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("silent portal: want ErrTimeout, got %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("timeout took %v", el)
	}
}

// One of two portals dies in the middle of a long read: the reader sees no
// error and every byte is right.
func TestFailover(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 64 << 20, Portals: 2})
	want, _ := os.ReadFile(tg.BackingFile)
	s := specOf(tg)
	if len(s.Portals) != 2 {
		t.Fatalf("portals %v", s.Portals)
	}
	s.RetryTimeout = 20 * time.Second
	d := openT(t, s)
	const piece = 256 << 10
	errc := make(chan error, 1)
	progress := make(chan int, 1024)
	go func() {
		buf := make([]byte, piece)
		for pass := 0; pass < 3; pass++ {
			for off := 0; off < len(want); off += piece {
				if _, err := d.ReadAt(buf, int64(off)); err != nil {
					errc <- err
					return
				}
				if !bytes.Equal(buf, want[off:off+piece]) {
					errc <- errors.New("bytes differ at " + strconv.Itoa(off))
					return
				}
				select {
				case progress <- off:
				default:
				}
			}
		}
		errc <- nil
	}()
	// Let the read get going, then kill the portal every session uses.
	for n := 0; n < 40; n++ {
		<-progress
	}
	tg.KillPortal(0)
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("reader saw an error across failover: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("reader stuck after failover")
	}
	for _, c := range d.conns {
		if c.up.Load() && c.portal != 1 {
			t.Fatalf("session %d still on portal %d", c.idx, c.portal)
		}
	}
}

// A dropped session on the only portal reconnects (the target restarts
// its connections, e.g. after a tgtadm connection delete).
func TestReconnectSamePortal(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 4 << 20})
	want, _ := os.ReadFile(tg.BackingFile)
	s := specOf(tg)
	s.Sessions = 2
	d := openT(t, s)
	buf := make([]byte, 1<<20)
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	// Drop every session on the target side.
	n := 0
	out, err := tg.Admin(0, "--mode", "target", "--op", "show")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if sid, ok := strings.CutPrefix(line, "I_T nexus: "); ok {
			if _, err := tg.Admin(0, "--mode", "conn", "--op", "delete", "--tid", "1", "--sid", sid, "--cid", "0"); err == nil {
				n++
			}
		}
	}
	if n == 0 {
		t.Fatalf("no session to drop in:\n%s", out)
	}
	for i := 0; i < 20; i++ {
		off := int64(i%4) << 20
		if _, err := d.ReadAt(buf, off); err != nil {
			t.Fatalf("read after the session dropped: %v", err)
		}
		if !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
			t.Fatal("bytes differ after reconnect")
		}
	}
}

// Close while a session logs in again to a portal that never answers
// returns at once instead of waiting out the login timeout.
func TestCloseDuringRedial(t *testing.T) {
	tg := tgt.Start(t, tgt.Options{Size: 4 << 20, Portals: 2})
	s := specOf(tg)
	s.Timeout = 5 * time.Second
	d := openT(t, s)
	if err := tg.Signal(1, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Signal(1, syscall.SIGCONT) })
	tg.KillPortal(0)
	for i := 0; d.conns[0].up.Load(); i++ {
		if i > 100 {
			t.Fatal("session still up after its portal died")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // now logging in to the silent portal
	start := time.Now()
	d.Close()
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("Close took %v", el)
	}
}
