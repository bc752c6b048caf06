package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// drainTimeout bounds how long a shut-down connection may take to send its
// last replies to a client that stopped reading.
const drainTimeout = 10 * time.Second

// conn is one client in the transmission phase. One goroutine reads
// requests, up to MaxInFlight workers run them, one goroutine writes replies.
type conn struct {
	srv      *Server
	nc       net.Conn
	r        *bufio.Reader
	sess     *session
	dev      blockdev.Device
	log      logrus.FieldLogger
	maxBlock uint32

	work    chan job // unbuffered: a send only succeeds into an idle worker
	workers int      // started so far; touched by the reader only
	running sync.WaitGroup

	// The device's asynchronous read path, if it has one: READs go to it
	// straight from the reader, without a worker, up to MaxInFlight at once.
	async   blockdev.AsyncReader
	slots   chan struct{}
	plugged bool // reads started since the last Unplug; reader only

	replies    chan reply
	pending    atomic.Int32 // requests read whose replies are not written yet
	writerDone chan struct{}

	stopping atomic.Bool
	stop     chan struct{} // closed by shutdown: wakes a reader waiting for memory
	done     chan struct{} // closed once the connection is gone
}

type job struct {
	req     request
	payload []byte // WRITE data, from getBuf
	cost    int64  // memory budget held until the reply is written
}

func newConn(srv *Server, nc net.Conn, r *bufio.Reader, sess *session, log logrus.FieldLogger) *conn {
	_, _, maxBlock := sess.export.blockSizes()
	return &conn{srv: srv, nc: nc, r: r, sess: sess, dev: sess.export.dev, log: log, maxBlock: maxBlock,
		work: make(chan job), replies: make(chan reply, 3*MaxInFlight),
		async: blockdev.AsyncOf(sess.export.dev), slots: make(chan struct{}, MaxInFlight),
		writerDone: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
}

// shutdown stops reading new requests; those already read still get
// their replies, within drainTimeout.
func (c *conn) shutdown() {
	if c.stopping.Swap(true) {
		return
	}
	close(c.stop)
	now := time.Now()
	_ = c.nc.SetReadDeadline(now)
	_ = c.nc.SetWriteDeadline(now.Add(drainTimeout))
}

// serve runs the connection until DISC, EOF, a framing error or shutdown,
// then waits for every started request to be answered.
func (c *conn) serve() {
	go c.writeLoop()
	c.readLoop()
	close(c.work)
	c.running.Wait()
	close(c.replies)
	<-c.writerDone
}

func (c *conn) readLoop() {
	var hdr [requestSize]byte
	defer c.unplug()
	for !c.stopping.Load() {
		if c.r.Buffered() < requestSize {
			c.unplug() // the next read may wait
		}
		if c.r.Buffered() == 0 && c.pending.Load() > 0 {
			// Let running requests finish before the read that will
			// probably find nothing and park: more requests arrive
			// meanwhile and fewer syscalls are wasted.
			runtime.Gosched()
		}
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrDeadlineExceeded) {
				c.log.WithError(err).Debug("nbd: connection ended")
			}
			return
		}
		req, err := decodeRequest(hdr[:])
		if err != nil {
			// Without a valid magic the next request cannot be found.
			c.log.WithError(err).Warn("nbd: dropping connection")
			return
		}
		var payload []byte
		var cost int64
		if req.typ == cmdWrite {
			if req.length > c.maxBlock {
				// Drain the payload so the stream stays in step, then refuse.
				// Draining waits on the client: send the reads started.
				c.unplug()
				if _, err := io.CopyN(io.Discard, c.r, int64(req.length)); err != nil {
					return
				}
				c.pending.Add(1)
				c.replies <- c.errorReply(req, errInval, fmt.Sprintf("write of %d bytes exceeds the maximum block size %d", req.length, c.maxBlock))
				continue
			}
			if req.length > 0 {
				// Take the memory before the payload is read: past the
				// bounds the client waits, its data left in the socket.
				cost = int64(bufCap(int(req.length)))
				if !c.acquire(cost) {
					return
				}
				if c.r.Buffered() < int(req.length) {
					c.unplug()
				}
				payload = c.getBuf(int(req.length))
				if _, err := io.ReadFull(c.r, payload); err != nil {
					c.putBuf(payload)
					c.release(cost)
					return
				}
			}
		}
		if req.typ == cmdDisc {
			return
		}
		if req.typ == cmdRead && req.length > 0 && req.length <= c.maxBlock {
			// Likewise for the buffer the data will be read into.
			cost = int64(bufCap(int(req.length)))
			if !c.acquire(cost) {
				return
			}
		}
		c.pending.Add(1)
		if req.typ == cmdRead && c.async != nil && c.readAsync(req, cost) {
			continue
		}
		c.dispatch(job{req, payload, cost})
	}
}

// unplug sends the reads started on the asynchronous path.
func (c *conn) unplug() {
	if c.plugged {
		c.plugged = false
		c.async.Unplug()
	}
}

// readAsync starts a READ on the device's asynchronous path, unless it is
// one for the synchronous path's checks and error replies. The reply is
// queued from the device's goroutine.
func (c *conn) readAsync(req request, cost int64) bool {
	size := c.dev.Size()
	off, length := int64(req.offset), int64(req.length)
	if length == 0 || req.flags&^c.allowedFlags(cmdRead) != 0 || req.length > c.maxBlock || req.offset > uint64(size) || length > size-off {
		return false
	}
	select {
	case c.slots <- struct{}{}:
	default:
		c.unplug() // what we wait for must be on its way
		c.slots <- struct{}{}
	}
	c.running.Add(1)
	c.srv.inFlight.Add(1)
	buf := c.getBuf(int(length))
	c.plugged = true
	c.async.ReadAtAsync(buf, off, func(err error) {
		var r reply
		if err != nil {
			c.putBuf(buf)
			r = c.deviceError(req, err)
		} else {
			r = c.readReply(req, buf)
		}
		r.cost = cost
		// done must not block the device's goroutine (it may serve every
		// connection) behind a client that is slow to read its replies.
		// The slot is held until the reply is queued, so at most
		// MaxInFlight goroutines wait here.
		select {
		case c.replies <- r:
			c.asyncDone()
		default:
			go func() {
				c.replies <- r
				c.asyncDone()
			}()
		}
	})
	return true
}

// asyncDone ends an asynchronous READ whose reply is queued.
func (c *conn) asyncDone() {
	c.srv.inFlight.Add(-1)
	c.srv.requests.Add(1)
	<-c.slots
	c.running.Done()
}

// dispatch hands j to an idle worker, starts a new one while fewer than
// MaxInFlight exist, or else waits for one to become idle. Workers live
// as long as the connection, so their stacks are grown once.
func (c *conn) dispatch(j job) {
	select {
	case c.work <- j:
		return
	default:
	}
	if c.workers < MaxInFlight {
		c.workers++
		c.running.Add(1)
		go c.worker(j)
		return
	}
	c.unplug()
	c.work <- j
}

func (c *conn) worker(j job) {
	defer c.running.Done()
	for {
		c.srv.inFlight.Add(1)
		r := c.handle(j.req, j.payload)
		if j.payload != nil {
			c.putBuf(j.payload)
		}
		r.cost = j.cost
		c.replies <- r
		c.srv.inFlight.Add(-1)
		c.srv.requests.Add(1)
		var ok bool
		if j, ok = <-c.work; !ok {
			return
		}
	}
}

func (c *conn) handle(req request, payload []byte) reply {
	caps := c.dev.Caps()
	size := c.dev.Size()
	off, length := int64(req.offset), int64(req.length)
	inRange := req.offset <= uint64(size) && length <= size-off
	where := func() string { return fmt.Sprintf("offset %d length %d, export size %d", off, length, size) }

	if req.typ <= cmdBlockStatus && req.typ != cmdDisc {
		if bad := req.flags &^ c.allowedFlags(req.typ); bad != 0 {
			return c.errorReply(req, errInval, fmt.Sprintf("command flags %#x are not valid for command %d on this connection", bad, req.typ))
		}
	}

	switch req.typ {
	case cmdRead:
		if !inRange {
			return c.errorReply(req, errInval, "read beyond the end of the export: "+where())
		}
		if req.length > c.maxBlock {
			return c.errorReply(req, errInval, fmt.Sprintf("read of %d bytes exceeds the maximum block size %d", length, c.maxBlock))
		}
		if length == 0 {
			// Unspecified by the spec; the kindest answer is an empty read.
			return c.readReply(req, nil)
		}
		// Read before sending anything: a simple reply cannot take an
		// error back once its header is on the wire.
		buf := c.getBuf(int(length))
		if _, err := c.dev.ReadAt(buf, off); err != nil {
			c.putBuf(buf)
			return c.deviceError(req, err)
		}
		return c.readReply(req, buf)
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if caps.ReadOnly {
			return c.errorReply(req, errPerm, "export is read-only")
		}
		if !inRange {
			// The protocol asks for ENOSPC on writes past the end.
			return c.errorReply(req, errNoSpc, "write beyond the end of the export: "+where())
		}
		if length == 0 {
			// Zero-length requests are unspecified (the spec only says not
			// to disconnect): nothing to do, so succeed without asking the
			// device, which may refuse a zero length (fallocate does).
			return simpleReply(req.cookie, 0, nil, false)
		}
		var err error
		switch req.typ {
		case cmdWrite:
			_, err = c.dev.WriteAt(payload, off)
		case cmdTrim:
			err = c.dev.Trim(off, length)
		case cmdWriteZeroes:
			if req.flags&cmdFlagFastZero != 0 && !caps.FastZero {
				return c.errorReply(req, errNotSup, "fast zeroing is not supported by this export")
			}
			// NO_HOLE needs no special case: WriteZeroes leaves the range
			// allocated (Trim is what deallocates).
			err = c.dev.WriteZeroes(off, length)
		}
		if err == nil && req.flags&cmdFlagFUA != 0 {
			err = c.dev.Flush()
		}
		return c.statusReply(req, err)
	case cmdFlush:
		return c.statusReply(req, c.dev.Flush())
	case cmdCache:
		// Advertising SEND_CACHE obliges us to refuse flags we do not
		// know: allowedFlags did.
		if !inRange {
			return c.errorReply(req, errInval, "cache request beyond the end of the export: "+where())
		}
		if length == 0 {
			// Nothing to bring close (and fadvise would read 0 as "to the end").
			return simpleReply(req.cookie, 0, nil, false)
		}
		return c.statusReply(req, c.dev.Prefetch(off, length))
	case cmdBlockStatus:
		if !c.sess.structured || !c.sess.metaCtx {
			return c.errorReply(req, errInval, "block status needs structured replies and the base:allocation context")
		}
		if !inRange || length == 0 {
			return c.errorReply(req, errInval, "block status outside the export: "+where())
		}
		ext, err := c.dev.BlockStatus(off, length)
		if err != nil {
			return c.deviceError(req, err)
		}
		return c.blockStatusReply(req, ext)
	default:
		return c.errorReply(req, errInval, fmt.Sprintf("unknown command %d", req.typ))
	}
}

// acquire takes n bytes from the export's and the server's memory budgets,
// in that order, waiting while they are used up. It returns false when the
// connection is shut down meanwhile. Only the reader calls it.
func (c *conn) acquire(n int64) bool {
	eb, sb := c.sess.export.budget, c.srv.budget
	haveExport := eb.tryAcquire(n)
	if haveExport && sb.tryAcquire(n) {
		return true
	}
	// The export's share may be held while waiting for the server's,
	// never the other way round, so waiters cannot wait on each other.
	c.unplug() // what we wait for must be on its way
	if !haveExport && !eb.acquire(n, c.stop) {
		return false
	}
	if !sb.acquire(n, c.stop) {
		eb.release(n)
		return false
	}
	return true
}

// release gives back what acquire(n) took.
func (c *conn) release(n int64) {
	if n > 0 {
		c.srv.budget.release(n)
		c.sess.export.budget.release(n)
	}
}

// getBuf and putBuf are the pool's, counting the bytes requests hold.
func (c *conn) getBuf(n int) []byte {
	b := getBuf(n)
	c.srv.held.add(int64(cap(b)))
	c.sess.export.held.add(int64(cap(b)))
	return b
}

func (c *conn) putBuf(b []byte) {
	if b == nil {
		return
	}
	c.srv.held.add(-int64(cap(b)))
	c.sess.export.held.add(-int64(cap(b)))
	putBuf(b)
}

// allowedFlags are the command flags valid for typ on this connection:
// those the spec defines for the command, and of them only the ones whose
// transmission flag was sent. FUA is valid on every command once
// advertised (clients are known to set it on reads).
func (c *conn) allowedFlags(typ uint16) uint16 {
	tf := c.sess.flags
	var f uint16
	if tf&flagSendFUA != 0 {
		f |= cmdFlagFUA
	}
	switch typ {
	case cmdRead:
		if tf&flagSendDF != 0 {
			f |= cmdFlagDF
		}
	case cmdWriteZeroes:
		f |= cmdFlagNoHole
		if tf&flagSendFastZero != 0 {
			f |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		f |= cmdFlagReqOne
	}
	return f
}

// readReply carries buf (from getBuf, or nil) as the data of a successful READ.
func (c *conn) readReply(req request, buf []byte) reply {
	if len(buf) == 0 {
		c.putBuf(buf)
		if !c.sess.structured {
			return simpleReply(req.cookie, 0, nil, false)
		}
		// OFFSET_DATA must carry at least one byte: say "done" instead.
		return chunkReply(req.cookie, replyTypeNone, nil, nil, false)
	}
	if !c.sess.structured {
		return simpleReply(req.cookie, 0, buf, true)
	}
	var prefix [8]byte
	binary.BigEndian.PutUint64(prefix[:], req.offset)
	return chunkReply(req.cookie, replyTypeOffsetData, prefix[:], buf, true)
}

// errno maps a layer's error to an NBD error code.
func (c *conn) errno(err error) uint32 {
	switch {
	case errors.Is(err, blockdev.ErrReadOnly):
		return errPerm
	case errors.Is(err, blockdev.ErrOutOfRange), errors.Is(err, blockdev.ErrInvalid):
		return errInval
	case errors.Is(err, blockdev.ErrUnsupported):
		// ENOTSUP is only defined for clients that negotiated structured replies.
		if c.sess.structured {
			return errNotSup
		}
		return errInval
	case errors.Is(err, blockdev.ErrNoSpace):
		return errNoSpc
	}
	return errIO
}

func (c *conn) deviceError(req request, err error) reply {
	code := c.errno(err)
	if code == errIO {
		c.log.WithError(err).WithField("request", req.String()).Warn("nbd: I/O error")
	}
	return c.errorReply(req, code, err.Error())
}

func (c *conn) statusReply(req request, err error) reply {
	if err != nil {
		return c.deviceError(req, err)
	}
	return simpleReply(req.cookie, 0, nil, false)
}

// errorReply carries the message in a structured error chunk when the
// client negotiated them; a simple reply has room for the code only.
func (c *conn) errorReply(req request, code uint32, msg string) reply {
	if !c.sess.structured {
		return simpleReply(req.cookie, code, nil, false)
	}
	msg = clipMessage(msg)
	p := make([]byte, 6+len(msg))
	binary.BigEndian.PutUint32(p[0:], code)
	binary.BigEndian.PutUint16(p[4:], uint16(len(msg)))
	copy(p[6:], msg)
	return chunkReply(req.cookie, replyTypeError, nil, p, false)
}

// blockStatusReply merges neighbouring extents with equal flags and, with
// REQ_ONE, sends only the first.
func (c *conn) blockStatusReply(req request, ext []blockdev.Extent) reply {
	p := binary.BigEndian.AppendUint32(make([]byte, 0, 4+8*len(ext)), baseAllocationID)
	var pending blockdev.Extent
	emit := func() {
		// The total is at most the 32-bit request length, so it fits.
		if pending.Length > 0 {
			p = binary.BigEndian.AppendUint32(p, uint32(pending.Length))
			p = binary.BigEndian.AppendUint32(p, pending.Flags)
		}
	}
	left := int64(req.length) // a faulty layer must not make us describe more
	for _, e := range ext {
		e.Length = min(e.Length, left)
		if e.Length <= 0 {
			continue
		}
		left -= e.Length
		if pending.Length > 0 && e.Flags == pending.Flags {
			pending.Length += e.Length
			continue
		}
		emit()
		pending = e
	}
	emit()
	if len(p) == 4 {
		return c.errorReply(req, errIO, "the device described no extent")
	}
	if req.flags&cmdFlagReqOne != 0 {
		p = p[:12]
	}
	return chunkReply(req.cookie, replyTypeBlockStatus, nil, p, false)
}

// clipMessage makes msg a valid protocol string: valid UTF-8, no NUL, at
// most maxNameLen (4096) bytes, cut at a character boundary.
func clipMessage(msg string) string {
	msg = strings.ReplaceAll(strings.ToValidUTF8(msg, "?"), "\x00", "?")
	if len(msg) <= maxNameLen {
		return msg
	}
	n := maxNameLen
	for n > 0 && !utf8.RuneStart(msg[n]) {
		n--
	}
	return msg[:n]
}
