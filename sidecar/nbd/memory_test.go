package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
	"github.com/vmthunder/vmthunder/sidecar/layer/delay"
)

// serveWith is serveDevs with server options; it returns the server too.
func serveWith(t *testing.T, opts []Option, exports map[string]blockdev.Device) (*Server, string) {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	srv := NewServer(log, opts...)
	for name, dev := range exports {
		if err := srv.Add(name, dev); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return srv, sock
}

// op is one request of a pipelined batch.
type op struct {
	typ    uint16
	off    uint64
	length uint32
	data   []byte // what a WRITE sends, what a READ must return
}

// pipeline sends every op on c at once (from another goroutine, so the
// client never stops sending to read) and checks the simple replies.
// Safe to run in a goroutine: it reports with t.Errorf.
func pipeline(t *testing.T, c *rawClient, ops []op) {
	c.c.SetDeadline(time.Now().Add(60 * time.Second))
	go func() {
		for i, o := range ops {
			var payload []byte
			if o.typ == cmdWrite {
				payload = o.data
			}
			c.send(o.typ, 0, uint64(i), o.off, o.length, payload)
		}
	}()
	seen := make([]bool, len(ops))
	h := make([]byte, 16)
	for range ops {
		if _, err := io.ReadFull(c.c, h); err != nil {
			t.Errorf("reading a reply: %v", err)
			return
		}
		errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		if binary.BigEndian.Uint32(h) != magicSimple || cookie >= uint64(len(ops)) || seen[cookie] {
			t.Errorf("bad reply header %x", h)
			return
		}
		seen[cookie] = true
		o := ops[cookie]
		if errno != 0 {
			t.Errorf("command %d at %d length %d: errno %d", o.typ, o.off, o.length, errno)
			return
		}
		if o.typ == cmdRead {
			got := make([]byte, o.length)
			if _, err := io.ReadFull(c.c, got); err != nil {
				t.Errorf("reading data: %v", err)
				return
			}
			if !bytes.Equal(got, o.data) {
				t.Errorf("read at %d length %d returned other data than was written", o.off, o.length)
			}
		}
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rand.Uint64())
	}
	return b
}

// Many large pipelined writes, then reads, to slow exports over several
// connections (raw clients and nbdcopy) never hold more request buffers
// than the bounds, and all complete with the right data; a request larger
// than the bounds runs alone.
func TestMemoryInFlightIsBounded(t *testing.T) {
	const (
		perServer = 20 << 20
		perExport = 12 << 20
		chunk     = 4 << 20
		perConn   = 8
		conns     = 3
	)
	a := memdev.New(conns * perConn * chunk)
	b := memdev.New(32 << 20)
	srv, sock := serveWith(t, []Option{WithMemoryLimits(perServer, perExport)}, map[string]blockdev.Device{
		"a": delay.New(a, 20*time.Millisecond, 20*time.Millisecond),
		"b": delay.New(b, 20*time.Millisecond, 20*time.Millisecond),
	})
	ea, eb := srv.lookup("a"), srv.lookup("b")
	src := filepath.Join(t.TempDir(), "src.img")
	srcData := randomBytes(32 << 20)
	if err := os.WriteFile(src, srcData, 0o644); err != nil {
		t.Fatal(err)
	}

	data := make([][]op, conns)
	for k := range data {
		for i := range perConn {
			off := uint64((k*perConn + i) * chunk)
			data[k] = append(data[k], op{cmdWrite, off, chunk, randomBytes(chunk)})
		}
	}
	runAll := func(typ uint16, withCopy bool) {
		var wg sync.WaitGroup
		for k := range conns {
			c := dialRaw(t, sock, "a")
			ops := make([]op, len(data[k]))
			for i, o := range data[k] {
				o.typ = typ
				ops[i] = o
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				pipeline(t, c, ops)
			}()
		}
		if withCopy {
			// nbdcopy: 2 connections (multi-conn) of 8 requests of 4 MiB.
			runWithin(t, time.Minute, "nbdcopy", "--connections=2", "--requests=8", "--request-size=4194304",
				"--flush", src, uri(sock, "b"))
		} else {
			runWithin(t, time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri(sock, "b"))
		}
		wg.Wait()
	}
	runAll(cmdWrite, true)
	runAll(cmdRead, false)
	if !bytes.Equal(b.Bytes(), srcData) {
		t.Fatal("nbdcopy's data did not land")
	}
	t.Logf("peaks: server %d MiB, export a %d MiB, export b %d MiB; budget peaks %d/%d/%d MiB",
		srv.held.peak.Load()>>20, ea.held.peak.Load()>>20, eb.held.peak.Load()>>20,
		srv.budget.peak.Load()>>20, ea.budget.peak.Load()>>20, eb.budget.peak.Load()>>20)
	if p := srv.held.peak.Load(); p > perServer {
		t.Errorf("the server held %d bytes of request buffers at once, over its bound %d", p, perServer)
	}
	for name, e := range map[string]*export{"a": ea, "b": eb} {
		if p := e.held.peak.Load(); p > perExport {
			t.Errorf("export %s held %d bytes of request buffers at once, over its bound %d", name, p, perExport)
		}
	}
	if p := srv.held.peak.Load(); p < 2*chunk {
		t.Errorf("the server never held more than %d bytes: requests were not served concurrently", p)
	}

	// One request larger than both bounds still runs, alone.
	srv.held.peak.Store(0)
	big := randomBytes(defaultMaxBlock)
	c := dialRaw(t, sock, "a")
	pipeline(t, c, []op{{cmdWrite, 0, defaultMaxBlock, big}})
	pipeline(t, c, []op{{cmdRead, 0, defaultMaxBlock, big}, {cmdRead, 4096, 4096, big[4096:8192]},
		{cmdRead, 0, defaultMaxBlock, big}})
	if p := srv.held.peak.Load(); p > defaultMaxBlock {
		t.Errorf("oversized requests: held %d bytes at once, more than one of them", p)
	}
	assertIdle(t, srv)
}

// assertIdle checks that every byte taken was given back.
func assertIdle(t *testing.T, srv *Server) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		busy := srv.held.cur.Load() != 0 || srv.budget.InUse() != 0
		for _, name := range srv.names() {
			busy = busy || srv.lookup(name).budget.InUse() != 0
		}
		if !busy {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after every reply: %d bytes of buffers held, server budget %d in use", srv.held.cur.Load(), srv.budget.InUse())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Bounds smaller than the requests, on synchronous and asynchronous
// exports, with many connections pipelining: everything completes.
func TestTinyMemoryBoundsDoNotDeadlock(t *testing.T) {
	async := &asyncDev{Dev: memdev.New(80 << 20), failAt: 1 << 62}
	srv, sock := serveWith(t, []Option{WithMemoryLimits(1<<20, 512<<10)}, map[string]blockdev.Device{
		"sync":  delay.New(memdev.New(80<<20), time.Millisecond, time.Millisecond),
		"async": async,
	})
	var wg sync.WaitGroup
	for k := range 6 {
		name := []string{"sync", "async"}[k%2]
		c := dialRaw(t, sock, name)
		var ops []op
		for i := range 4 {
			n := []int{4 << 20, 4096, 16 << 20, 65536}[i]
			off := uint64(k/2*(25<<20) + []int{0, 4 << 20, 8 << 20, 24 << 20}[i]) // disjoint
			d := randomBytes(n)
			ops = append(ops, op{cmdWrite, off, uint32(n), d})
		}
		for _, o := range slices.Clone(ops) {
			o.typ = cmdRead
			ops = append(ops, o)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Writes first, replies awaited, then the reads: a read may
			// not overtake the write it checks.
			pipeline(t, c, ops[:4])
			pipeline(t, c, ops[4:])
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(90 * time.Second):
		t.Fatal("pipelined requests under tiny memory bounds did not complete")
	}
	if async.started.Load() == 0 {
		t.Error("no read took the asynchronous path")
	}
	assertIdle(t, srv)
}

// A client that stops reading its replies holds memory; a reader of
// another export waiting for it must still give way to Remove and Close.
func TestRemoveWakesAReaderWaitingForMemory(t *testing.T) {
	srv, sock := serveWith(t, []Option{WithMemoryLimits(8<<20, 8<<20)}, map[string]blockdev.Device{
		"hog": memdev.New(32 << 20), "b": memdev.New(1 << 20),
	})
	hog := dialRaw(t, sock, "hog")
	for i := range 4 {
		hog.send(cmdRead, 0, uint64(i), 0, 8<<20, nil) // replies never read
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.budget.InUse() < 8<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("the hog holds %d bytes, want 8 MiB", srv.budget.InUse())
		}
		time.Sleep(time.Millisecond)
	}
	c := dialRaw(t, sock, "b")
	c.send(cmdRead, 0, 1, 0, 4096, nil)
	time.Sleep(100 * time.Millisecond) // let the read wait for memory
	if st := srv.Stats(); st.InFlight > 1 {
		t.Fatalf("stats %+v", st)
	}
	removed := make(chan error, 1)
	go func() { removed <- srv.Remove("b") }()
	select {
	case err := <-removed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Remove hangs behind a reader waiting for memory")
	}
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.c.Read(make([]byte, 16)); err != io.EOF {
		t.Fatalf("after Remove: read %d %v, want EOF", n, err)
	}
	hog.c.Close() // its replies fail; its memory comes back
	assertIdle(t, srv)
}

// The budget serves waiters in order, charges an oversized request the
// whole budget, and a waiter that gives up lets those behind it through.
func TestMemoryBudgetOrderAndCancel(t *testing.T) {
	b := NewMemoryBudget(100)
	if !b.tryAcquire(60) || b.tryAcquire(50) {
		t.Fatal("tryAcquire: 60 then 50 of 100")
	}
	got := make(chan int, 3)
	stopBig := make(chan struct{})
	go func() { // waits first, for everything (1000 is charged as 100)
		if b.acquire(1000, stopBig) {
			got <- 1000
		} else {
			got <- -1
		}
	}()
	waitWaiters := func(n int) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			b.mu.Lock()
			l := b.waiters.Len()
			b.mu.Unlock()
			if l == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d waiters, want %d", l, n)
			}
		}
	}
	waitWaiters(1)
	go func() { // fits now, but waits behind the first
		b.acquire(10, nil)
		got <- 10
	}()
	waitWaiters(2)
	if b.tryAcquire(1) {
		t.Fatal("tryAcquire jumped the queue")
	}
	close(stopBig) // the first gives up: the second goes through
	if v := <-got; v != -1 {
		t.Fatalf("first waiter: %d", v)
	}
	if v := <-got; v != 10 {
		t.Fatalf("second waiter: %d", v)
	}
	b.release(60)
	b.release(10)
	if b.InUse() != 0 {
		t.Fatalf("in use %d after releasing everything", b.InUse())
	}
	if !b.tryAcquire(1000) || b.InUse() != 100 {
		t.Fatalf("an oversized request takes the whole budget: in use %d", b.InUse())
	}
	b.release(1000)
}
