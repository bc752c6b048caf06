package bulk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// NBD wire constants (NetworkBlockDevice proto.md) the client and the
// recorder need.
const (
	nbdMagicInit       = 0x4e42444d41474943 // "NBDMAGIC"
	nbdMagicOpt        = 0x49484156454f5054 // "IHAVEOPT"
	nbdMagicOptReply   = 0x3e889045565a9
	nbdMagicRequest    = 0x25609513
	nbdMagicSimple     = 0x67446698
	nbdMagicStructured = 0x668e33ef
	nbdFlagFixed       = 1
	nbdFlagNoZeroes    = 2
	nbdOptExportName   = 1
	nbdOptGo           = 7
	nbdRepAck          = 1
	nbdRepInfo         = 3
	nbdRepErrBit       = 1 << 31
	nbdCmdRead         = 0
	nbdCmdWrite        = 1
	nbdCmdDisc         = 2
	nbdReplyFlagDone   = 1
	nbdMaxOptReply     = 1 << 20
)

// NBDClient is a minimal NBD client (fixed newstyle, NBD_OPT_GO, simple
// replies) with many reads in flight on one connection, as QEMU has.
type NBDClient struct {
	conn net.Conn
	Size int64

	wmu     sync.Mutex
	w       *bufio.Writer
	mu      sync.Mutex
	pending map[uint64]*nbdCall
	next    uint64
	err     error
}

type nbdCall struct {
	buf  []byte
	done chan error
}

// DialNBD connects to export name on a unix socket.
func DialNBD(socket, name string) (*NBDClient, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	c := &NBDClient{conn: conn, w: bufio.NewWriter(conn), pending: map[uint64]*nbdCall{}}
	r := bufio.NewReaderSize(conn, 256<<10)
	if err := c.handshake(r, name); err != nil {
		conn.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", socket, err)
	}
	go c.receive(r)
	return c, nil
}

func (c *NBDClient) handshake(r *bufio.Reader, name string) error {
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagicInit || binary.BigEndian.Uint64(hello[8:]) != nbdMagicOpt {
		return errors.New("not a newstyle NBD server")
	}
	if binary.BigEndian.Uint16(hello[16:])&nbdFlagFixed == 0 {
		return errors.New("server is not fixed newstyle")
	}
	// Option NBD_OPT_GO with the name and no info requests.
	data := make([]byte, 4+len(name)+2)
	binary.BigEndian.PutUint32(data, uint32(len(name)))
	copy(data[4:], name)
	msg := make([]byte, 4+16+len(data))
	binary.BigEndian.PutUint32(msg[0:], nbdFlagFixed|nbdFlagNoZeroes)
	binary.BigEndian.PutUint64(msg[4:], nbdMagicOpt)
	binary.BigEndian.PutUint32(msg[12:], nbdOptGo)
	binary.BigEndian.PutUint32(msg[16:], uint32(len(data)))
	copy(msg[20:], data)
	if _, err := c.conn.Write(msg); err != nil {
		return err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return err
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if binary.BigEndian.Uint64(h[0:]) != nbdMagicOptReply || n > nbdMaxOptReply {
			return errors.New("bad option reply")
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			return err
		}
		switch {
		case typ == nbdRepAck:
			if c.Size == 0 {
				return errors.New("server sent no export size")
			}
			return nil
		case typ&nbdRepErrBit != 0:
			return fmt.Errorf("export %q refused (reply %#x): %s", name, typ, payload)
		case typ == nbdRepInfo && len(payload) >= 12 && binary.BigEndian.Uint16(payload) == 0:
			c.Size = int64(binary.BigEndian.Uint64(payload[2:]))
		}
	}
}

func (c *NBDClient) receive(r *bufio.Reader) {
	var err error
	for {
		var h [16]byte
		if _, err = io.ReadFull(r, h[:]); err != nil {
			break
		}
		if binary.BigEndian.Uint32(h[0:]) != nbdMagicSimple {
			err = errors.New("nbd: not a simple reply")
			break
		}
		code, handle := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		call := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if call == nil {
			err = fmt.Errorf("nbd: reply to unknown handle %d", handle)
			break
		}
		if code != 0 {
			call.done <- fmt.Errorf("nbd read: error %d", code)
			continue
		}
		if _, err = io.ReadFull(r, call.buf); err != nil {
			call.done <- err
			break
		}
		call.done <- nil
	}
	c.mu.Lock()
	c.err = fmt.Errorf("nbd connection: %w", err)
	for h, call := range c.pending {
		call.done <- c.err
		delete(c.pending, h)
	}
	c.mu.Unlock()
}

// ReadAt reads len(p) bytes at off.
func (c *NBDClient) ReadAt(p []byte, off int64) (int, error) {
	call := &nbdCall{buf: p, done: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return 0, c.err
	}
	c.next++
	h := c.next
	c.pending[h] = call
	c.mu.Unlock()
	var req [28]byte
	binary.BigEndian.PutUint32(req[0:], nbdMagicRequest)
	binary.BigEndian.PutUint16(req[6:], nbdCmdRead)
	binary.BigEndian.PutUint64(req[8:], h)
	binary.BigEndian.PutUint64(req[16:], uint64(off))
	binary.BigEndian.PutUint32(req[24:], uint32(len(p)))
	c.wmu.Lock()
	_, err := c.w.Write(req[:])
	if err == nil {
		err = c.w.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		c.conn.Close() // the receiver fails every pending read, this one too
	}
	if err := <-call.done; err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close disconnects.
func (c *NBDClient) Close() error {
	var req [28]byte
	binary.BigEndian.PutUint32(req[0:], nbdMagicRequest)
	binary.BigEndian.PutUint16(req[6:], nbdCmdDisc)
	c.wmu.Lock()
	c.w.Write(req[:])
	c.w.Flush()
	c.wmu.Unlock()
	return c.conn.Close()
}
