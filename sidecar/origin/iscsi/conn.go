package iscsi

/*
#cgo pkg-config: libiscsi
#include <stdlib.h>
#include "vt.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"golang.org/x/sys/unix"
)

// request is one SCSI command. Its buffer is pinned while libiscsi may
// write into it.
type request struct {
	op      C.int
	lba     uint64
	nblocks uint32
	buf     []byte

	// Result, valid after done is closed.
	err       error
	transport bool // the session failed under it: retry elsewhere
	retry     bool // the target asked for a retry (UNIT ATTENTION, BUSY)
	rcLBA     uint64
	rcBlock   uint32
	rcLBPME   bool
	done      chan struct{} // closed at the end, unless cb is set
	cb        func()        // called at the end instead (ReadAtAsync)
}

func newRequest(op C.int, lba uint64, nblocks uint32, buf []byte) *request {
	return &request{op: op, lba: lba, nblocks: nblocks, buf: buf, done: make(chan struct{})}
}

// inflight pairs a request with its C side.
type inflight struct {
	r      *request
	cr     *C.vt_req
	pinner runtime.Pinner
	start  time.Time
}

// conn is one session, served by three goroutines while it is up: the
// submitter writes queued commands to the socket, a batch at a time (so
// they share TCP segments), the loop waits for responses on Go's network
// poller and completes requests, and the flusher waits for room when the
// socket is full. libiscsi is not thread safe: every call is under mu. No
// goroutine blocks inside C: a blocking cgo call costs an OS thread
// hand-off per wake-up, which at 4 KiB random reads cost more than the
// iSCSI work itself.
type conn struct {
	d   *Dev
	idx int

	up      atomic.Bool
	started atomic.Bool  // loop is running: it owns the session's lifetime
	load    atomic.Int32 // queued or in flight, for picking a session
	portal  int          // index of the portal in use (loop goroutine only)
	dialed  *C.vt_conn   // logged in, not yet attached (loop goroutine only)
	lastErr atomic.Pointer[error]

	qmu       sync.Mutex
	queue     []*request // waiting for the submitter
	accepting bool       // the session is attached: queue, don't fail
	held      atomic.Bool

	mu   sync.Mutex
	vc   *C.vt_conn // nil while the session is down
	sock *os.File   // a dup of libiscsi's socket, registered with Go's poller
	fly  map[uint64]*inflight
	next uint64

	wake chan struct{} // commands are queued: the submitter sends them
	kick chan struct{} // the socket was full: the flusher waits for room
	quit chan struct{}
	gone chan struct{}
}

func newConn(d *Dev, idx int) (*conn, error) {
	return &conn{d: d, idx: idx, fly: map[uint64]*inflight{}, wake: make(chan struct{}, 1),
		kick: make(chan struct{}, 1), quit: make(chan struct{}), gone: make(chan struct{})}, nil
}

func (c *conn) setErr(err error) { c.lastErr.Store(&err) }

func (c *conn) err() error {
	if p := c.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

// start queues r for the submitter and wakes it; r ends (r.done closes,
// or r.cb runs) when the target answers or the command fails.
func (c *conn) start(r *request) {
	if c.enqueue(r) {
		c.signal()
	}
}

// startHeld queues r without waking the submitter: release does.
func (c *conn) startHeld(r *request) {
	if c.enqueue(r) {
		c.held.Store(true)
	}
}

// release wakes the submitter for commands startHeld queued.
func (c *conn) release() {
	if c.held.Swap(false) {
		c.signal()
	}
}

func (c *conn) enqueue(r *request) bool {
	c.load.Add(1)
	c.qmu.Lock()
	if !c.accepting {
		c.qmu.Unlock()
		r.err = c.err()
		if r.err == nil {
			r.err = fmt.Errorf("%w: session down", ErrConnection)
		}
		r.transport = true
		c.complete(r)
		return false
	}
	c.queue = append(c.queue, r)
	c.qmu.Unlock()
	return true
}

func (c *conn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// submitter sends what is queued, corked when there are several, so a
// batch leaves in as few TCP segments (and target wake-ups) as fit.
func (c *conn) submitter(stop, done chan struct{}) {
	defer close(done)
	var q []*request
	for {
		select {
		case <-stop:
			return
		case <-c.wake:
		}
		c.qmu.Lock()
		q, c.queue = c.queue, q[:0]
		c.qmu.Unlock()
		if len(q) == 0 {
			continue
		}
		var ended []*request
		c.mu.Lock()
		if c.vc == nil {
			c.mu.Unlock()
			for _, r := range q {
				r.err, r.transport = fmt.Errorf("%w: session down", ErrConnection), true
			}
			c.completeAll(q)
			clear(q)
			continue
		}
		for _, r := range q {
			if c.submit(c.vc, r) == nil {
				ended = append(ended, r)
			}
		}
		st := C.vt_push(c.vc, C.int(boolInt(len(q) > 1)))
		ended = c.popLocked(ended)
		c.mu.Unlock()
		clear(q) // the requests are the loop's now
		c.completeAll(ended)
		c.after(st)
	}
}

// popLocked collects finished commands into ended.
func (c *conn) popLocked(ended []*request) []*request {
	for cr := C.vt_pop(c.vc); cr != nil; cr = C.vt_pop(c.vc) {
		if f := c.fly[uint64(cr.id)]; f != nil {
			c.finish(f)
			ended = append(ended, f.r)
		}
	}
	return ended
}

// serviceLocked runs libiscsi without blocking and collects what finished.
func (c *conn) serviceLocked(in bool) ([]*request, C.int) {
	st := C.vt_service(c.vc, C.int(boolInt(in)))
	return c.popLocked(nil), st
}

// after acts on vt_service's verdict outside the lock.
func (c *conn) after(st C.int) {
	switch {
	case st < 0:
		c.poke() // the loop notices the dead session and drops it
	case st > 0:
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
}

// poke wakes the loop out of its wait on the socket.
func (c *conn) poke() {
	c.mu.Lock()
	if c.sock != nil {
		c.sock.SetReadDeadline(time.Now())
	}
	c.mu.Unlock()
}

func (c *conn) completeAll(rs []*request) {
	for _, r := range rs {
		c.complete(r)
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// dialAny logs in through the portals starting at first, trying each once.
func (c *conn) dialAny(first int) error {
	n := len(c.d.spec.Portals)
	var errs []error
	for k := 0; k < n; k++ {
		i := (first + k) % n
		err := c.dial(i)
		if err == nil {
			c.portal = i
			return nil
		}
		errs = append(errs, err)
		// A refused login will be refused on every path: say so at once.
		if errors.Is(err, ErrAuth) || errors.Is(err, ErrClosed) {
			break
		}
	}
	if len(errs) == 1 {
		return errs[0]
	}
	return errors.Join(errs...)
}

// dial connects, logs in and checks the LUN (TEST UNIT READY, which also
// consumes the unit attention a fresh session gets) through portal i.
func (c *conn) dial(i int) error {
	s := &c.d.spec
	p := s.Portals[i]
	cInit := C.CString(s.Initiator)
	cIQN := C.CString(p.IQN)
	cUser := C.CString(s.User)
	cPass := C.CString(s.Password)
	cPortal := C.CString(p.Addr)
	defer func() {
		C.free(unsafe.Pointer(cInit))
		C.free(unsafe.Pointer(cIQN))
		C.free(unsafe.Pointer(cUser))
		C.free(unsafe.Pointer(cPass))
		C.free(unsafe.Pointer(cPortal))
	}()
	tsec := int(s.Timeout / time.Second)
	if tsec < 1 {
		tsec = 1
	}
	vc := C.vt_new(cInit, cIQN, C.int(p.LUN), cUser, cPass, C.int(tsec))
	if vc == nil {
		return fmt.Errorf("iscsi: cannot create a libiscsi context")
	}
	where := fmt.Sprintf("portal %s target %s LUN %d", p.Addr, p.IQN, p.LUN)
	fail := func(err error) error {
		c.destroy(vc)
		return err
	}
	deadline := time.Now().Add(s.Timeout)
	if C.vt_connect(vc, cPortal) != 0 {
		return fail(fmt.Errorf("%w: %s: %s", ErrUnreachable, where, C.GoString(C.vt_error(vc))))
	}
	for vc.connect_done == 0 {
		if c.closing() {
			return fail(ErrClosed)
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("%w: TCP connect to %s after %v", ErrTimeout, where, s.Timeout))
		}
		if C.vt_poll(vc, 100) < 0 && vc.connect_done == 0 {
			break
		}
	}
	if vc.connect_done != 0 && vc.connect_status == C.SCSI_STATUS_TIMEOUT {
		return fail(fmt.Errorf("%w: TCP connect to %s after %v", ErrTimeout, where, s.Timeout))
	}
	if vc.connect_done == 0 || vc.connect_status != 0 {
		if e := syscall.Errno(vc.sock_errno); e != 0 {
			return fail(fmt.Errorf("%w: %s: %w", ErrUnreachable, where, e))
		}
		return fail(fmt.Errorf("%w: %s: %s", ErrUnreachable, where, C.GoString(C.vt_error(vc))))
	}
	if C.vt_login(vc) != 0 {
		return fail(fmt.Errorf("%w: %s: %s", ErrLogin, where, C.GoString(C.vt_error(vc))))
	}
	for vc.login_done == 0 {
		if c.closing() {
			return fail(ErrClosed)
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("%w: login to %s after %v", ErrTimeout, where, s.Timeout))
		}
		if C.vt_poll(vc, 100) < 0 && vc.login_done == 0 {
			break
		}
	}
	if vc.login_done == 0 || vc.login_status != 0 {
		msg := C.GoString(C.vt_error(vc))
		if vc.login_done == 0 {
			// tgtd drops the connection instead of answering some refusals.
			return fail(fmt.Errorf("%w: %s: connection closed during login: %s", ErrLogin, where, msg))
		}
		cause := loginCause(msg)
		if vc.login_status == C.SCSI_STATUS_TIMEOUT {
			cause = ErrTimeout
		}
		hint := ""
		if cause == ErrAuth {
			if s.User == "" {
				hint = " (the target wants CHAP; no credentials given)"
			} else {
				hint = fmt.Sprintf(" (CHAP user %q)", s.User)
			}
		}
		return fail(fmt.Errorf("%w: %s%s: %s", cause, where, hint, msg))
	}
	// The session is up; check the LUN with a few tries for unit attentions.
	for try := 0; ; try++ {
		r := newRequest(C.VT_TUR, 0, 0, nil)
		err := c.runSync(vc, r, deadline)
		if err == nil {
			break
		}
		if r.retry && try < 5 {
			continue
		}
		return fail(fmt.Errorf("%s: %w", where, err))
	}
	c.dialed = vc
	return nil
}

// closing says Close was called: a redial must not hold Close up for a
// whole Timeout per portal.
func (c *conn) closing() bool {
	select {
	case <-c.quit:
		return true
	default:
		return false
	}
}

// destroy frees a session nobody waits on (during dial and Open): the
// commands it died under are released once libiscsi is done with them.
func (c *conn) destroy(vc *C.vt_conn) {
	C.vt_free(vc)
	for id, f := range c.fly {
		delete(c.fly, id)
		f.pinner.Unpin()
		C.vt_req_release(f.cr)
	}
}

// runSync runs one request on vc from the calling goroutine (before the
// loop owns vc, or from the loop itself).
func (c *conn) runSync(vc *C.vt_conn, r *request, deadline time.Time) error {
	f := c.submit(vc, r)
	if f == nil {
		return r.err
	}
	for {
		if cr := C.vt_pop(vc); cr != nil {
			if cr == f.cr {
				c.finish(f)
				return r.err
			}
		}
		if c.closing() {
			// f stays in c.fly: the caller destroys vc, then releases it.
			r.err = ErrClosed
			return r.err
		}
		if vc.dead != 0 || time.Now().After(deadline) {
			err := fmt.Errorf("%w: no answer to a command in %v", ErrTimeout, c.d.spec.Timeout)
			if vc.dead != 0 {
				err = fmt.Errorf("%w: %s", ErrConnection, C.GoString(C.vt_error(vc)))
			}
			// f stays in c.fly: the caller destroys vc, then releases it.
			r.transport = true
			r.err = err
			return err
		}
		C.vt_poll(vc, 100)
	}
}

// submit creates the C side of r and queues it in libiscsi. On failure r
// is completed with the error and nil is returned.
func (c *conn) submit(vc *C.vt_conn, r *request) *inflight {
	cr := (*C.vt_req)(C.calloc(1, C.size_t(unsafe.Sizeof(C.vt_req{}))))
	if cr == nil {
		r.err = fmt.Errorf("iscsi: out of memory")
		return nil
	}
	c.next++
	f := &inflight{r: r, cr: cr, start: time.Now()}
	cr.op = r.op
	cr.lba = C.uint64_t(r.lba)
	cr.nblocks = C.uint32_t(r.nblocks)
	cr.blocksize = C.uint32_t(c.d.blockSize)
	cr.id = C.uint64_t(c.next)
	if len(r.buf) > 0 {
		// libiscsi keeps this pointer after the call returns: pin it.
		f.pinner.Pin(&r.buf[0])
		cr.iov.iov_base = unsafe.Pointer(&r.buf[0])
		cr.iov.iov_len = C.size_t(len(r.buf))
	}
	if C.vt_submit(vc, cr) != 0 {
		f.pinner.Unpin()
		C.vt_req_release(cr)
		r.transport = true
		r.err = fmt.Errorf("%w: cannot queue command: %s", ErrConnection, C.GoString(C.vt_error(vc)))
		return nil
	}
	c.fly[c.next] = f
	return f
}

// finish turns a completed C request into r's result and frees it.
func (c *conn) finish(f *inflight) {
	delete(c.fly, uint64(f.cr.id))
	f.pinner.Unpin()
	r, cr := f.r, f.cr
	status := int(cr.status)
	switch {
	case status == C.SCSI_STATUS_GOOD:
		if cr.rc_bad != 0 {
			r.err = fmt.Errorf("%w: cannot decode READ CAPACITY data", ErrSCSI)
			break
		}
		r.rcLBA, r.rcBlock, r.rcLBPME = uint64(cr.rc_lba), uint32(cr.rc_blocklen), cr.rc_lbpme != 0
		if cr.residual_status == C.SCSI_RESIDUAL_UNDERFLOW && cr.residual > 0 && len(r.buf) > 0 {
			r.err = fmt.Errorf("%w: target sent %d of %d bytes", blockdev.ErrShortIO, len(r.buf)-int(cr.residual), len(r.buf))
		}
	case status == C.SCSI_STATUS_CHECK_CONDITION:
		r.err = senseError(r.op, int(cr.sense_key), int(cr.ascq))
		r.retry = int(cr.sense_key) == C.SCSI_SENSE_UNIT_ATTENTION
	case status == C.SCSI_STATUS_BUSY || status == C.SCSI_STATUS_TASK_SET_FULL:
		r.err = fmt.Errorf("%w: target busy (status 0x%x)", ErrSCSI, status)
		r.retry = true
	case status == C.SCSI_STATUS_TIMEOUT:
		r.err = fmt.Errorf("%w: command not answered in %v", ErrTimeout, c.d.spec.Timeout)
		r.transport = true
	case status == C.SCSI_STATUS_CANCELLED || status == C.SCSI_STATUS_ERROR:
		r.err = fmt.Errorf("%w: %s", ErrConnection, C.GoString(C.vt_error(cr.conn)))
		r.transport = true
	default:
		r.err = fmt.Errorf("%w: SCSI status 0x%x", ErrSCSI, status)
	}
	C.vt_req_release(cr)
}

func (c *conn) deadErr(vc *C.vt_conn) error {
	p := c.d.spec.Portals[c.portal]
	msg := C.GoString(C.vt_error(vc))
	if e := syscall.Errno(vc.sock_errno); e != 0 {
		return fmt.Errorf("%w: portal %s: %s: %w", ErrConnection, p.Addr, msg, e)
	}
	return fmt.Errorf("%w: portal %s: %s", ErrConnection, p.Addr, msg)
}

// tick is how often the loop runs libiscsi's timeout scan and looks for a
// socket closed while idle (libiscsi notices EOF only when it reads).
const tick = 250 * time.Millisecond

// loop logs the session in (again), then serves it until it drops.
func (c *conn) loop() {
	defer close(c.gone)
	backoff := 50 * time.Millisecond
	for {
		select {
		case <-c.quit:
			c.drop(ErrClosed)
			return
		default:
		}
		c.mu.Lock()
		down := c.vc == nil
		c.mu.Unlock()
		if down {
			c.up.Store(false)
			err := c.dialAny((c.portal + 1) % len(c.d.spec.Portals))
			if err == nil {
				err = c.attach()
			}
			if err != nil {
				c.setErr(err)
				select {
				case <-c.quit:
					c.drop(ErrClosed)
					return
				case <-time.After(backoff):
				}
				backoff = min(backoff*2, 2*time.Second)
				continue
			}
			backoff = 50 * time.Millisecond
			c.up.Store(true)
			c.d.notifyUp()
		}
		err := c.serve()
		c.setErr(err)
		c.up.Store(false)
		c.drop(err)
	}
}

// attach publishes the session dial left in c.dialed to other goroutines
// and registers its socket with Go's poller. The dup shares the socket
// (and libiscsi's O_NONBLOCK); closing it leaves libiscsi's descriptor
// alone.
func (c *conn) attach() error {
	vc := c.dialed
	c.dialed = nil
	fd, err := unix.FcntlInt(uintptr(C.vt_fd(vc)), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		c.destroy(vc)
		return fmt.Errorf("%w: dup socket: %v", ErrConnection, err)
	}
	sock := os.NewFile(uintptr(fd), "iscsi")
	if err := sock.SetReadDeadline(time.Time{}); err != nil {
		sock.Close()
		c.destroy(vc)
		return fmt.Errorf("%w: socket cannot use the poller: %v", ErrConnection, err)
	}
	c.mu.Lock()
	c.vc, c.sock = vc, sock
	c.mu.Unlock()
	c.qmu.Lock()
	c.accepting = true
	c.qmu.Unlock()
	return nil
}

// serve waits for responses on the poller and completes them until the
// session dies or the device closes. It returns why it stopped.
func (c *conn) serve() error {
	c.mu.Lock()
	sock, vc := c.sock, c.vc
	c.mu.Unlock()
	if sock == nil || vc == nil {
		return fmt.Errorf("%w: session down", ErrConnection)
	}
	raw, err := sock.SyscallConn()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConnection, err)
	}
	stop, flushDone, submitDone := make(chan struct{}), make(chan struct{}), make(chan struct{})
	defer func() {
		// Stop the helpers: closing the dup wakes the flusher from a wait
		// for room.
		close(stop)
		c.mu.Lock()
		c.sock = nil
		c.mu.Unlock()
		sock.Close()
		<-flushDone
		<-submitDone
	}()
	go c.flusher(raw, stop, flushDone)
	go c.submitter(stop, submitDone)
	c.signal() // commands queued before the session was served

	dead := false
	service := func() {
		c.mu.Lock()
		done, st := c.serviceLocked(true)
		c.mu.Unlock()
		c.completeAll(done)
		if st < 0 {
			dead = true
		} else if st > 0 {
			c.after(st)
		}
	}
	for {
		select {
		case <-c.quit:
			return ErrClosed
		default:
		}
		sock.SetReadDeadline(time.Now().Add(tick))
		err := raw.Read(func(uintptr) bool {
			service()
			return dead
		})
		if dead {
			return c.deadErr(vc)
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("%w: %v", ErrConnection, err)
		}
		// Every tick (or poke): timeouts, and EOF on an idle socket.
		service()
		if dead || c.overdue() {
			return c.deadErr(vc)
		}
	}
}

// flusher writes queued commands when the socket has room again.
func (c *conn) flusher(raw syscall.RawConn, stop, done chan struct{}) {
	defer close(done)
	for {
		select {
		case <-stop:
			return
		case <-c.kick:
		}
		err := raw.Write(func(uintptr) bool {
			c.mu.Lock()
			if c.vc == nil {
				c.mu.Unlock()
				return true
			}
			done, st := c.serviceLocked(false)
			c.mu.Unlock()
			c.completeAll(done)
			if st < 0 {
				c.poke()
			}
			return st <= 0
		})
		if err != nil {
			return // the socket was closed: the session is over
		}
	}
}

// overdue is a backstop for libiscsi's own timeouts.
func (c *conn) overdue() bool {
	limit := c.d.spec.Timeout + 2*time.Second
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, f := range c.fly {
		if time.Since(f.start) > limit {
			return true
		}
	}
	return false
}

// drop destroys the session and fails what was in flight as transport
// errors, which the device retries on another session.
func (c *conn) drop(err error) {
	transport := !errors.Is(err, ErrClosed)
	c.qmu.Lock()
	c.accepting = false
	failed := c.queue
	c.queue = nil
	c.qmu.Unlock()
	for _, r := range failed {
		r.err, r.transport = err, transport
	}
	c.mu.Lock()
	vc := c.vc
	c.vc = nil
	if vc != nil {
		C.vt_free(vc) // libiscsi lets go of every buffer here
		for id, f := range c.fly {
			delete(c.fly, id)
			f.pinner.Unpin()
			C.vt_req_release(f.cr)
			f.r.err, f.r.transport = err, transport
			failed = append(failed, f.r)
		}
	}
	c.mu.Unlock()
	c.completeAll(failed)
}

func (c *conn) complete(r *request) {
	c.load.Add(-1)
	if r.cb != nil {
		r.cb()
		return
	}
	close(r.done)
}
