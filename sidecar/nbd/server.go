// Package nbd is VMThunder's NBD server: fixed newstyle handshake,
// structured replies with base:allocation, and every transmission command,
// serving blockdev.Devices by export name. Requests on one connection run
// concurrently; one goroutine per connection writes the replies.
package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// MaxInFlight bounds concurrent requests per connection.
const MaxInFlight = 64

// defaultMaxBlock is the largest request we accept when the device sets
// none: the protocol's recommended 32 MiB.
const defaultMaxBlock = 32 << 20

// handshakeTimeout bounds the negotiation, so a silent client does not
// hold a connection for ever.
const handshakeTimeout = 30 * time.Second

// maxHandshakes bounds the clients negotiating at once; more are closed
// as they are accepted.
const maxHandshakes = 256

// unixSendBuffer is the socket send buffer asked for on unix connections
// (the kernel caps it at net.core.wmem_max).
const unixSendBuffer = 4 << 20

// Server serves exports over any number of listeners.
type Server struct {
	log logrus.FieldLogger

	mu        sync.Mutex
	exports   map[string]*export
	listeners map[net.Listener]struct{}
	pending   map[net.Conn]struct{} // connections still negotiating
	// maxHandshakes bounds len(pending) (tests lower it).
	maxHandshakes int
	closed        bool

	connections atomic.Int64
	inFlight    atomic.Int64
	requests    atomic.Uint64

	budget    *MemoryBudget // request buffers of every export (budget.go)
	exportMem int64         // the bound of each export's own budget
	held      memCounter    // request buffers allocated now
}

type export struct {
	dev     blockdev.Device
	conns   map[*conn]struct{}
	removed bool
	budget  *MemoryBudget
	held    memCounter
}

// Stats are a server's counters.
type Stats struct {
	Connections int64  // clients in the transmission phase
	InFlight    int64  // requests being served
	Requests    uint64 // requests answered since the start
	Buffered    int64  // bytes of request and reply buffers held now
}

// Option configures a Server.
type Option func(*Server)

// WithMemoryLimits bounds the bytes of request buffers (WRITE payloads,
// READ data until it is sent) held at once by the whole server and by each
// export. A zero or negative value keeps the default (DefaultServerMemory,
// DefaultExportMemory). Clients past a bound wait: their requests are not
// read until earlier ones are answered.
func WithMemoryLimits(perServer, perExport int64) Option {
	return func(s *Server) {
		if perServer > 0 {
			s.budget = NewMemoryBudget(perServer)
		}
		if perExport > 0 {
			s.exportMem = perExport
		}
	}
}

// WithMemoryBudget makes the server take its requests' buffers from b,
// which other servers may share (a daemon serving each export with its
// own Server bounds them all together this way).
func WithMemoryBudget(b *MemoryBudget) Option {
	return func(s *Server) {
		if b != nil {
			s.budget = b
		}
	}
}

// NewServer returns a server with no exports.
func NewServer(log logrus.FieldLogger, opts ...Option) *Server {
	if log == nil {
		log = logrus.StandardLogger()
	}
	s := &Server{log: log, exports: map[string]*export{},
		listeners: map[net.Listener]struct{}{}, pending: map[net.Conn]struct{}{},
		exportMem: DefaultExportMemory, maxHandshakes: maxHandshakes}
	for _, o := range opts {
		o(s)
	}
	if s.budget == nil {
		s.budget = NewMemoryBudget(DefaultServerMemory)
	}
	return s
}

// Stats returns the current counters.
func (s *Server) Stats() Stats {
	return Stats{Connections: s.connections.Load(), InFlight: s.inFlight.Load(), Requests: s.requests.Load(),
		Buffered: s.held.cur.Load()}
}

// Add makes dev available as export name ("" is the default export).
func (s *Server) Add(name string, dev blockdev.Device) error {
	if len(name) > 4096 {
		return fmt.Errorf("nbd: export name longer than 4096 bytes")
	}
	if dev == nil {
		return fmt.Errorf("nbd: export %q has no device", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[name]; ok {
		return fmt.Errorf("nbd: export %q already exists", name)
	}
	s.exports[name] = &export{dev: dev, conns: map[*conn]struct{}{}, budget: NewMemoryBudget(s.exportMem)}
	return nil
}

// Remove withdraws an export: new clients cannot open it, and connected
// clients are cut off once their in-flight requests are answered. It
// returns when they are gone. The device is not closed.
func (s *Server) Remove(name string) error {
	s.mu.Lock()
	e, ok := s.exports[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("nbd: no export %q", name)
	}
	delete(s.exports, name)
	e.removed = true
	conns := make([]*conn, 0, len(e.conns))
	for c := range e.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	stopAll(conns)
	return nil
}

// Serve accepts connections on l until l is closed (then it returns nil).
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("nbd: server closed")
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	for {
		nc, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return nil
		}
		if len(s.pending) >= s.maxHandshakes {
			// Each negotiating client holds up to ~130 KiB (buffers and
			// one option) for up to handshakeTimeout: bound them.
			s.mu.Unlock()
			s.log.WithField("remote", nc.RemoteAddr().String()).
				Warnf("nbd: %d clients already negotiating: connection refused", s.maxHandshakes)
			nc.Close()
			continue
		}
		s.pending[nc] = struct{}{}
		s.mu.Unlock()
		go s.serveConn(nc)
	}
}

// Close stops every listener, cuts every client once its in-flight
// requests are answered, and returns when they are gone. Devices are not
// closed.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for nc := range s.pending {
		nc.Close()
	}
	var conns []*conn
	for _, e := range s.exports {
		for c := range e.conns {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	stopAll(conns)
	return nil
}

func stopAll(conns []*conn) {
	for _, c := range conns {
		c.shutdown()
	}
	for _, c := range conns {
		<-c.done
	}
}

func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

func (s *Server) names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.exports))
	for n := range s.exports {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func (s *Server) serveConn(nc net.Conn) {
	defer nc.Close()
	log := s.log.WithField("remote", nc.RemoteAddr().String())
	r := bufio.NewReaderSize(nc, 64<<10)
	_ = nc.SetDeadline(time.Now().Add(handshakeTimeout))
	sess, err := s.handshake(r, bufio.NewWriterSize(nc, 4<<10))
	_ = nc.SetDeadline(time.Time{})
	s.mu.Lock()
	delete(s.pending, nc)
	if err == nil && (sess.export.removed || s.closed) {
		err = errors.New("nbd: export withdrawn during the handshake")
	}
	if err != nil {
		s.mu.Unlock()
		if !errors.Is(err, errAborted) {
			log.WithError(err).Debug("nbd: handshake ended")
		}
		return
	}
	if uc, ok := nc.(*net.UnixConn); ok {
		// Room for a few large replies: fewer wakeups per MiB sent. TCP
		// sizes its own buffers.
		_ = uc.SetWriteBuffer(unixSendBuffer)
	}
	c := newConn(s, nc, r, sess, log)
	sess.export.conns[c] = struct{}{}
	s.mu.Unlock()

	s.connections.Add(1)
	c.serve()
	s.connections.Add(-1)
	s.mu.Lock()
	delete(sess.export.conns, c)
	s.mu.Unlock()
	nc.Close()
	close(c.done)
}

// transmissionFlags are what the export supports, from its device's caps.
func (e *export) transmissionFlags(structured bool) uint16 {
	c := e.dev.Caps()
	f := uint16(flagHasFlags)
	if structured {
		f |= flagSendDF // we never fragment a read, so DF is free
	}
	if c.ReadOnly {
		f |= flagReadOnly
	} else {
		f |= flagSendFUA // FUA is a Flush after the write
		if c.Trim {
			f |= flagSendTrim
		}
		if c.WriteZeroes {
			f |= flagSendZeroes
			if c.FastZero {
				f |= flagSendFastZero
			}
		}
	}
	if c.Flush {
		f |= flagSendFlush
	}
	if c.Prefetch {
		f |= flagSendCache
	}
	if c.MultiConn {
		f |= flagMultiConn
	}
	return f
}

// blockSizes are the device's constraints with the protocol's defaults
// filled in.
func (e *export) blockSizes() (minBlock, preferred, maxBlock uint32) {
	c := e.dev.Caps()
	minBlock, preferred, maxBlock = c.MinBlock, c.PreferredBlock, c.MaxBlock
	if minBlock == 0 {
		minBlock = 1
	}
	if preferred == 0 {
		preferred = 4096
	}
	preferred = max(preferred, minBlock, 512)
	if maxBlock == 0 || maxBlock > defaultMaxBlock {
		maxBlock = defaultMaxBlock
	}
	return minBlock, preferred, maxBlock
}
