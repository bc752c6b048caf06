// Package nbd is VMThunder's NBD server: fixed newstyle handshake,
// structured replies with base:allocation, and every transmission command,
// serving blockdev.Devices by export name. Requests on one connection run
// concurrently; one lock serialises the replies.
package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// MaxInFlight bounds concurrent requests per connection.
const MaxInFlight = 64

// defaultMaxBlock is the largest request we accept when the device sets none.
const defaultMaxBlock = 32 << 20

// Server serves exports over any number of listeners.
type Server struct {
	log logrus.FieldLogger

	mu        sync.Mutex
	exports   map[string]*export
	listeners map[net.Listener]struct{}
	closed    bool
}

type export struct {
	dev         blockdev.Device
	description string
	conns       map[*conn]struct{}
	removed     bool
}

// NewServer returns a server with no exports.
func NewServer(log logrus.FieldLogger) *Server {
	if log == nil {
		log = logrus.StandardLogger()
	}
	return &Server{log: log, exports: map[string]*export{}, listeners: map[net.Listener]struct{}{}}
}

// Add makes dev available as export name.
func (s *Server) Add(name string, dev blockdev.Device) error {
	if len(name) > 4096 {
		return fmt.Errorf("nbd: export name longer than 4096 bytes")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[name]; ok {
		return fmt.Errorf("nbd: export %q already exists", name)
	}
	s.exports[name] = &export{dev: dev, conns: map[*conn]struct{}{}}
	return nil
}

// Remove withdraws an export: new clients cannot open it, connected
// clients are cut off once their in-flight requests are answered. The
// device is not closed.
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
	for _, c := range conns {
		c.shutdown()
	}
	return nil
}

// Serve accepts connections on l until l is closed.
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
		go s.serveConn(nc)
	}
}

// Close stops every listener and cuts every connection.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var conns []*conn
	for l := range s.listeners {
		l.Close()
	}
	for _, e := range s.exports {
		for c := range e.conns {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.shutdown()
	}
	return nil
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
	r := bufio.NewReaderSize(nc, 256<<10)
	w := bufio.NewWriterSize(nc, 256<<10)
	sess, err := s.handshake(r, w)
	if err != nil {
		if !errors.Is(err, errAborted) {
			log.WithError(err).Debug("nbd handshake ended")
		}
		return
	}
	c := newConn(nc, r, w, sess, log)
	s.mu.Lock()
	if sess.export.removed || s.closed {
		s.mu.Unlock()
		return
	}
	sess.export.conns[c] = struct{}{}
	s.mu.Unlock()
	c.serve()
	s.mu.Lock()
	delete(sess.export.conns, c)
	s.mu.Unlock()
}

func (e *export) transmissionFlags() uint16 {
	c := e.dev.Caps()
	f := uint16(flagHasFlags | flagSendDF)
	if c.ReadOnly {
		f |= flagReadOnly
	} else {
		f |= flagSendFUA
		if c.Flush {
			f |= flagSendFlush
		}
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
	if c.ReadOnly && c.Flush {
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

func (e *export) blockSizes() (min, pref, max uint32) {
	c := e.dev.Caps()
	min, pref, max = c.MinBlock, c.PreferredBlock, c.MaxBlock
	if min == 0 {
		min = 1
	}
	if pref == 0 {
		pref = 4096
	}
	if pref < min {
		pref = min
	}
	if max == 0 || max > defaultMaxBlock {
		max = defaultMaxBlock
	}
	return min, pref, max
}
