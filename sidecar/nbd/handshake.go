package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// errAborted means the client ended the handshake on purpose (OPT_ABORT or
// a LIST-and-go-away): not worth a warning.
var errAborted = errors.New("nbd: client aborted the handshake")

// session is what the handshake agreed on.
type session struct {
	export     *export
	structured bool
	metaCtx    bool   // base:allocation selected
	metaExport string // the export it was selected for
	flags      uint16 // transmission flags sent for export
}

// handshake runs fixed newstyle negotiation until the client picks an export.
func (s *Server) handshake(r *bufio.Reader, w *bufio.Writer) (*session, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicInit)
	binary.BigEndian.PutUint64(hello[8:], magicOpt)
	binary.BigEndian.PutUint16(hello[16:], handshakeFixed|handshakeNoZeros)
	if _, err := w.Write(hello[:]); err != nil {
		return nil, err
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	var cflags [4]byte
	if _, err := io.ReadFull(r, cflags[:]); err != nil {
		return nil, fmt.Errorf("nbd: reading client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cflags[:])
	if clientFlags&^uint32(handshakeFixed|handshakeNoZeros) != 0 {
		return nil, fmt.Errorf("nbd: unknown client flags %#x", clientFlags)
	}
	noZeroes := clientFlags&handshakeNoZeros != 0

	sess := &session{}
	for {
		var hdr [16]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, fmt.Errorf("nbd: reading option: %w", err)
		}
		if binary.BigEndian.Uint64(hdr[0:]) != magicOpt {
			return nil, errors.New("nbd: bad option magic")
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLen {
			// No option we know is this long (names are at most 4096
			// bytes). Skip it unread and say so; only EXPORT_NAME, which
			// cannot be answered with an error, and absurd lengths end
			// the connection (the spec allows a hard disconnect for a
			// denial of service).
			if opt == optExportName || length > maxSkippedOption {
				return nil, fmt.Errorf("nbd: option %d of %d bytes: dropping the client", opt, length)
			}
			if _, err := io.CopyN(io.Discard, r, int64(length)); err != nil {
				return nil, fmt.Errorf("nbd: skipping option data: %w", err)
			}
			msg := fmt.Sprintf("option %d of %d bytes exceeds the server's limit of %d bytes", opt, length, maxOptionLen)
			if err := writeOptReply(w, opt, repErrTooBig, []byte(msg)); err != nil {
				return nil, err
			}
			if err := w.Flush(); err != nil {
				return nil, err
			}
			continue
		}
		if opt == optExportName && length > maxNameLen {
			// It cannot name an export, and EXPORT_NAME has no error reply.
			return nil, fmt.Errorf("nbd: EXPORT_NAME of %d bytes, longer than any export name: dropping the client", length)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(r, data); err != nil {
			return nil, fmt.Errorf("nbd: reading option data: %w", err)
		}
		done, err := s.option(w, sess, opt, data, noZeroes)
		if err != nil {
			return nil, err
		}
		if err := w.Flush(); err != nil {
			return nil, err
		}
		if done {
			return sess, nil
		}
	}
}

// option answers one option; done is true once transmission starts.
func (s *Server) option(w *bufio.Writer, sess *session, opt uint32, data []byte, noZeroes bool) (bool, error) {
	reply := func(typ uint32, payload []byte) error { return writeOptReply(w, opt, typ, payload) }
	replyErr := func(typ uint32, msg string) error { return reply(typ, []byte(msg)) }
	switch opt {
	case optExportName:
		e := s.lookup(string(data))
		if e == nil {
			return false, fmt.Errorf("nbd: client asked for unknown export %s", quoteName(string(data)))
		}
		sess.flags = e.transmissionFlags(sess.structured)
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(e.dev.Size()))
		binary.BigEndian.PutUint16(b[8:], sess.flags)
		n := len(b)
		if noZeroes {
			n = 10
		}
		if _, err := w.Write(b[:n]); err != nil {
			return false, err
		}
		// As with GO: contexts chosen for another export do not carry over.
		sess.metaCtx = sess.metaCtx && sess.metaExport == string(data)
		sess.export = e
		return true, nil
	case optAbort:
		_ = reply(repAck, nil)
		_ = w.Flush()
		return false, errAborted
	case optList:
		if len(data) != 0 {
			return false, replyErr(repErrInvalid, "LIST takes no data")
		}
		for _, name := range s.names() {
			b := make([]byte, 4+len(name))
			binary.BigEndian.PutUint32(b, uint32(len(name)))
			copy(b[4:], name)
			if err := reply(repServer, b); err != nil {
				return false, err
			}
		}
		return false, reply(repAck, nil)
	case optStructuredReply:
		if len(data) != 0 {
			return false, replyErr(repErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		sess.structured = true
		return false, reply(repAck, nil)
	case optInfo, optGo:
		name, infos, ok := parseInfoRequest(data)
		if !ok {
			return false, replyErr(repErrInvalid, "malformed INFO/GO request")
		}
		e := s.lookup(name)
		if e == nil {
			return false, replyErr(repErrUnknown, "unknown export "+quoteName(name))
		}
		flags := e.transmissionFlags(sess.structured)
		if err := writeInfos(w, opt, e, flags, name, infos); err != nil {
			return false, err
		}
		if err := reply(repAck, nil); err != nil {
			return false, err
		}
		if opt == optGo {
			// Contexts chosen for another export do not carry over.
			sess.metaCtx = sess.metaCtx && sess.metaExport == name
			sess.export = e
			sess.flags = flags
			return true, nil
		}
		return false, nil
	case optListMetaContext, optSetMetaContext:
		return false, s.metaContext(w, sess, opt, data)
	default:
		return false, replyErr(repErrUnsup, fmt.Sprintf("option %d not supported", opt))
	}
}

func parseInfoRequest(d []byte) (name string, infos []uint16, ok bool) {
	if len(d) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(d)
	if uint64(n)+6 > uint64(len(d)) {
		return "", nil, false
	}
	name = string(d[4 : 4+n])
	rest := d[4+n:]
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return "", nil, false
	}
	for i := 0; i < count; i++ {
		infos = append(infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, infos, true
}

// writeInfos always sends INFO_EXPORT and INFO_BLOCK_SIZE (clients that did
// not ask ignore it), plus INFO_NAME when asked. We have no description.
func writeInfos(w *bufio.Writer, opt uint32, e *export, flags uint16, name string, asked []uint16) error {
	exp := make([]byte, 12)
	binary.BigEndian.PutUint16(exp[0:], infoExport)
	binary.BigEndian.PutUint64(exp[2:], uint64(e.dev.Size()))
	binary.BigEndian.PutUint16(exp[10:], flags)
	if err := writeOptReply(w, opt, repInfo, exp); err != nil {
		return err
	}
	minBlock, preferred, maxBlock := e.blockSizes()
	bs := make([]byte, 14)
	binary.BigEndian.PutUint16(bs[0:], infoBlockSize)
	binary.BigEndian.PutUint32(bs[2:], minBlock)
	binary.BigEndian.PutUint32(bs[6:], preferred)
	binary.BigEndian.PutUint32(bs[10:], maxBlock)
	if err := writeOptReply(w, opt, repInfo, bs); err != nil {
		return err
	}
	if slices.Contains(asked, infoName) {
		b := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(name)), infoName)
		if err := writeOptReply(w, opt, repInfo, append(b, name...)); err != nil {
			return err
		}
	}
	return nil
}

// metaContext handles LIST_ and SET_META_CONTEXT; only base:allocation exists.
func (s *Server) metaContext(w *bufio.Writer, sess *session, opt uint32, d []byte) error {
	bad := func(msg string) error { return writeOptReply(w, opt, repErrInvalid, []byte(msg)) }
	if opt == optSetMetaContext {
		// SET replaces the previous selection even when it fails.
		sess.metaCtx = false
	}
	if opt == optSetMetaContext && !sess.structured {
		return bad("SET_META_CONTEXT needs structured replies first")
	}
	if len(d) < 4 {
		return bad("malformed meta context request")
	}
	n := binary.BigEndian.Uint32(d)
	if uint64(n)+8 > uint64(len(d)) {
		return bad("malformed meta context request")
	}
	name := string(d[4 : 4+n])
	rest := d[4+n:]
	count := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < count; i++ {
		if len(rest) < 4 {
			return bad("malformed meta context query")
		}
		l := binary.BigEndian.Uint32(rest)
		if uint64(l)+4 > uint64(len(rest)) {
			return bad("malformed meta context query")
		}
		queries = append(queries, string(rest[4:4+l]))
		rest = rest[4+l:]
	}
	if len(rest) != 0 {
		return bad("trailing bytes in meta context request")
	}
	if s.lookup(name) == nil {
		return writeOptReply(w, opt, repErrUnknown, []byte("unknown export "+quoteName(name)))
	}
	match := false
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	for _, q := range queries {
		if q == baseAllocation || (opt == optListMetaContext && (q == "base:" || strings.HasPrefix(baseAllocation, q) && strings.HasSuffix(q, ":"))) {
			match = true
		}
	}
	if opt == optSetMetaContext {
		sess.metaCtx, sess.metaExport = match, name
	}
	if match {
		b := make([]byte, 4+len(baseAllocation))
		binary.BigEndian.PutUint32(b, baseAllocationID)
		copy(b[4:], baseAllocation)
		if err := writeOptReply(w, opt, repMetaContext, b); err != nil {
			return err
		}
	}
	return writeOptReply(w, opt, repAck, nil)
}

func writeOptReply(w *bufio.Writer, opt, typ uint32, payload []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(payload)))
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

// quoteName renders a name a client sent for an error reply or a log line:
// quoted, with anything but printable text escaped, and cut after about
// maxEchoedName bytes of output with its length said. Whatever the client
// sent (up to 64 KiB, any bytes), the result is short valid UTF-8 without
// control characters, well inside the spec's 4096-byte limit on strings.
func quoteName(name string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(name); {
		if b.Len() > maxEchoedName {
			fmt.Fprintf(&b, `"... (%d bytes)`, len(name))
			return b.String()
		}
		r, n := utf8.DecodeRuneInString(name[i:])
		if r != utf8.RuneError && r != '"' && r != '\\' && unicode.IsPrint(r) {
			b.WriteString(name[i : i+n])
		} else {
			q := strconv.Quote(name[i : i+n]) // \x00, \xff, \u2028, \"
			b.WriteString(q[1 : len(q)-1])
		}
		i += n
	}
	b.WriteByte('"')
	return b.String()
}
