package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// conn is one client in the transmission phase.
type conn struct {
	nc   net.Conn
	r    *bufio.Reader
	sess *session
	dev  blockdev.Device
	log  logrus.FieldLogger

	wmu     sync.Mutex // one reply on the wire at a time
	w       *bufio.Writer
	waiting atomic.Int32 // replies ready to send; the last one flushes

	sem      chan struct{}
	inflight sync.WaitGroup
	maxBlock uint32
	stopOnce sync.Once
}

func newConn(nc net.Conn, r *bufio.Reader, w *bufio.Writer, sess *session, log logrus.FieldLogger) *conn {
	_, _, max := sess.export.blockSizes()
	return &conn{nc: nc, r: r, w: w, sess: sess, dev: sess.export.dev, log: log,
		sem: make(chan struct{}, MaxInFlight), maxBlock: max}
}

// shutdown stops reading new requests; in-flight ones still get replies.
func (c *conn) shutdown() {
	c.stopOnce.Do(func() {
		if cr, ok := c.nc.(interface{ CloseRead() error }); ok && cr.CloseRead() == nil {
			return
		}
		_ = c.nc.SetReadDeadline(time.Now())
	})
}

// serve reads requests until DISC, EOF or a fatal framing error, running
// each in its own goroutine (at most MaxInFlight at a time).
func (c *conn) serve() {
	defer c.inflight.Wait()
	var hdr [requestSize]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.log.WithError(err).Debug("nbd: connection ended")
			}
			return
		}
		req, err := decodeRequest(hdr[:])
		if err != nil {
			// Without a valid magic we cannot find the next request.
			c.log.WithError(err).Warn("nbd: dropping connection")
			return
		}
		var payload []byte
		if req.typ == cmdWrite {
			if req.length > c.maxBlock {
				// Drain the payload so the stream stays in step, then refuse.
				if _, err := io.CopyN(io.Discard, c.r, int64(req.length)); err != nil {
					return
				}
				c.replyError(req, errInval, fmt.Sprintf("write of %d bytes exceeds maximum block size %d", req.length, c.maxBlock))
				continue
			}
			payload = getBuf(int(req.length))
			if _, err := io.ReadFull(c.r, payload); err != nil {
				putBuf(payload)
				return
			}
		}
		if req.typ == cmdDisc {
			return
		}
		c.sem <- struct{}{}
		c.inflight.Add(1)
		go func() {
			defer func() { <-c.sem; c.inflight.Done() }()
			c.handle(req, payload)
		}()
	}
}

func (c *conn) handle(req request, payload []byte) {
	if payload != nil {
		defer putBuf(payload)
	}
	caps := c.dev.Caps()
	size := c.dev.Size()
	off, length := int64(req.offset), int64(req.length)
	inRange := req.offset <= uint64(size) && length <= size-off

	switch req.typ {
	case cmdRead:
		if !inRange {
			c.replyError(req, errInval, fmt.Sprintf("read beyond end of device (offset %d length %d size %d)", off, length, size))
			return
		}
		if length > int64(c.maxBlock) {
			c.replyError(req, errInval, fmt.Sprintf("read of %d bytes exceeds maximum block size %d", length, c.maxBlock))
			return
		}
		buf := getBuf(int(length))
		defer putBuf(buf)
		if _, err := c.dev.ReadAt(buf, off); err != nil {
			c.replyErr(req, err)
			return
		}
		c.replyRead(req, buf)
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if caps.ReadOnly {
			c.replyError(req, errPerm, "export is read-only")
			return
		}
		if !inRange {
			c.replyError(req, errNoSpc, fmt.Sprintf("write beyond end of device (offset %d length %d size %d)", off, length, size))
			return
		}
		var err error
		switch req.typ {
		case cmdWrite:
			_, err = c.dev.WriteAt(payload, off)
		case cmdTrim:
			err = c.dev.Trim(off, length)
		case cmdWriteZeroes:
			if req.flags&cmdFlagFastZero != 0 && !caps.FastZero {
				c.replyError(req, errNotSup, "fast zero not supported")
				return
			}
			err = c.dev.WriteZeroes(off, length)
		}
		if err == nil && req.flags&cmdFlagFUA != 0 {
			err = c.dev.Flush()
		}
		c.replyStatus(req, err)
	case cmdFlush:
		c.replyStatus(req, c.dev.Flush())
	case cmdCache:
		if !inRange {
			c.replyError(req, errInval, "cache request beyond end of device")
			return
		}
		c.replyStatus(req, c.dev.Prefetch(off, length))
	case cmdBlockStatus:
		if !c.sess.structured || !c.sess.metaCtx {
			c.replyError(req, errInval, "block status needs structured replies and base:allocation")
			return
		}
		if !inRange || length == 0 {
			c.replyError(req, errInval, "block status range outside device")
			return
		}
		ext, err := c.dev.BlockStatus(off, length)
		if err != nil {
			c.replyErr(req, err)
			return
		}
		c.replyBlockStatus(req, ext)
	default:
		c.replyError(req, errInval, fmt.Sprintf("unknown command %d", req.typ))
	}
}

// errno maps a layer's error to an NBD error code.
func (c *conn) errno(err error) uint32 {
	switch {
	case errors.Is(err, blockdev.ErrReadOnly):
		return errPerm
	case errors.Is(err, blockdev.ErrOutOfRange), errors.Is(err, blockdev.ErrInvalid):
		return errInval
	case errors.Is(err, blockdev.ErrUnsupported):
		if c.sess.structured {
			return errNotSup
		}
		return errInval
	case errors.Is(err, blockdev.ErrNoSpace):
		return errNoSpc
	}
	return errIO
}

func (c *conn) replyErr(req request, err error) {
	code := c.errno(err)
	if code == errIO {
		c.log.WithError(err).WithField("request", req.String()).Warn("nbd: I/O error")
	}
	c.replyError(req, code, err.Error())
}

func (c *conn) replyStatus(req request, err error) {
	if err != nil {
		c.replyErr(req, err)
		return
	}
	c.replySimple(req.cookie, 0, nil)
}

// replyError uses a structured error chunk (which carries the message) when
// negotiated, a simple reply otherwise.
func (c *conn) replyError(req request, code uint32, msg string) {
	if !c.sess.structured {
		c.replySimple(req.cookie, code, nil)
		return
	}
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	p := make([]byte, 6+len(msg))
	binary.BigEndian.PutUint32(p[0:], code)
	binary.BigEndian.PutUint16(p[4:], uint16(len(msg)))
	copy(p[6:], msg)
	c.replyChunk(req.cookie, replyTypeError, nil, p)
}

func (c *conn) replyRead(req request, data []byte) {
	if !c.sess.structured {
		c.replySimple(req.cookie, 0, data)
		return
	}
	var off [8]byte
	binary.BigEndian.PutUint64(off[:], req.offset)
	c.replyChunk(req.cookie, replyTypeOffsetData, off[:], data)
}

func (c *conn) replyBlockStatus(req request, ext []blockdev.Extent) {
	p := make([]byte, 4, 4+8*len(ext))
	binary.BigEndian.PutUint32(p, baseAllocationID)
	var pending blockdev.Extent
	flushExtent := func() {
		for pending.Length > 0 {
			n := min(pending.Length, int64(1<<32-4096))
			p = binary.BigEndian.AppendUint32(p, uint32(n))
			p = binary.BigEndian.AppendUint32(p, pending.Flags)
			pending.Length -= n
		}
	}
	for _, e := range ext {
		if e.Length <= 0 {
			continue
		}
		if pending.Length > 0 && e.Flags == pending.Flags {
			pending.Length += e.Length
			continue
		}
		flushExtent()
		pending = e
	}
	flushExtent()
	if len(p) == 4 {
		c.replyError(req, errIO, "device described no extent")
		return
	}
	if req.flags&cmdFlagReqOne != 0 {
		p = p[:12]
	}
	c.replyChunk(req.cookie, replyTypeBlockStatus, nil, p)
}

func (c *conn) replySimple(cookie uint64, code uint32, data []byte) {
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], magicSimple)
	binary.BigEndian.PutUint32(h[4:], code)
	binary.BigEndian.PutUint64(h[8:], cookie)
	c.send(h[:], nil, data)
}

// replyChunk sends one structured chunk with the DONE flag.
func (c *conn) replyChunk(cookie uint64, typ uint16, prefix, data []byte) {
	var h [20]byte
	binary.BigEndian.PutUint32(h[0:], magicStructured)
	binary.BigEndian.PutUint16(h[4:], replyFlagDone)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint32(h[16:], uint32(len(prefix)+len(data)))
	c.send(h[:], prefix, data)
}

// send writes one reply. Under load several replies share one flush (one
// write syscall): whoever brings the count of waiting senders to zero
// flushes, so no reply is left in the buffer.
func (c *conn) send(h, prefix, data []byte) {
	c.waiting.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.w.Write(h)
	c.w.Write(prefix)
	c.w.Write(data)
	if c.waiting.Add(-1) == 0 {
		if err := c.w.Flush(); err != nil {
			c.shutdown()
		}
	}
}

// Buffers come from per-power-of-two pools so a busy connection does not
// allocate per request.
var bufPools [26]sync.Pool

func poolIndex(n int) int {
	if n <= 4096 {
		return 0
	}
	return bits.Len(uint(n-1)) - 12
}

func getBuf(n int) []byte {
	i := poolIndex(n)
	if i >= len(bufPools) {
		return make([]byte, n)
	}
	if b, ok := bufPools[i].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 4096<<i)
}

func putBuf(b []byte) {
	i := poolIndex(cap(b))
	if i >= len(bufPools) || cap(b) != 4096<<i {
		return
	}
	b = b[:cap(b)]
	bufPools[i].Put(&b)
}
