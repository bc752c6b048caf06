package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// patternFile makes a file export of size bytes, every byte 0xab.
func patternFile(t *testing.T, size int) blockdev.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), "p.img")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0xab}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	return openFile(t, path, false)
}

// Zero-length READ, WRITE, TRIM, WRITE_ZEROES and CACHE are no-ops that
// succeed (the spec leaves them unspecified but says not to disconnect);
// the file origin used to answer a zero-length TRIM with EIO (fallocate
// refuses a zero length). They touch nothing, with or without FUA, at
// any offset up to the export size; beyond it they are still refused.
func TestZeroLengthRequestsSucceed(t *testing.T) {
	const size = 1 << 20
	sock := serveDevs(t, map[string]blockdev.Device{"file": patternFile(t, size), "mem": memdev.New(size)})
	for _, name := range []string{"file", "mem"} {
		c := dialRaw(t, sock, name)
		for i, typ := range []uint16{cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes, cmdCache} {
			for j, off := range []uint64{0, 4096, size} {
				for _, flags := range []uint16{0, cmdFlagFUA} {
					if typ == cmdCache || typ == cmdRead {
						flags = 0
					}
					cookie := uint64(100*i + 10*j + int(flags))
					c.send(typ, flags, cookie, off, 0, nil)
					if errno, got, _ := c.reply(0); errno != 0 || got != cookie {
						t.Errorf("%s: zero-length command %d flags %#x at %d: errno %d cookie %d, want success", name, typ, flags, off, errno, got)
					}
				}
			}
			// Past the end is still an error.
			c.send(typ, 0, 999, size+4096, 0, nil)
			if errno, _, _ := c.reply(0); errno == 0 {
				t.Errorf("%s: zero-length command %d past the end succeeded", name, typ)
			}
		}
		c.send(cmdRead, 0, 1, 0, 4, nil)
		if errno, _, data := c.reply(4); errno != 0 || (name == "file" && !bytes.Equal(data, []byte{0xab, 0xab, 0xab, 0xab})) {
			t.Fatalf("%s: read after zero-length requests: errno %d data %x", name, errno, data)
		}
	}

	// The same through libnbd, with its client-side checks off so it sends
	// the zero-length requests, with simple and with structured replies.
	out := libnbd(t, `
for structured in (False, True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    h.connect_uri(sys.argv[1])
    assert h.get_structured_replies_negotiated() == structured
    for off in (0, 4096, h.get_size()):
        assert h.pread(0, off) == b""
        h.pwrite(b"", off)
        h.pwrite(b"", off, nbd.CMD_FLAG_FUA)
        h.trim(0, off)
        h.trim(0, off, nbd.CMD_FLAG_FUA)
        h.zero(0, off)
        h.zero(0, off, nbd.CMD_FLAG_NO_HOLE)
        h.cache(0, off)
    assert h.pread(4, 0) == b"\xab" * 4
    h.shutdown()
print("ok")
`, uri(sock, "file"))
	if out != "ok" {
		t.Fatalf("libnbd: %s", out)
	}
}

// An unknown export name is echoed in the error reply only up to a bound,
// as valid UTF-8 without control characters, however long or odd the
// name the client sent.
func TestUnknownExportErrorIsBounded(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"": memdev.New(1 << 20)})
	long := strings.Repeat("x", 4096)
	odd := "a\x00b\xff\x1b[31m" + strings.Repeat("é", 100)
	checkMsg := func(what string, msg []byte) {
		t.Helper()
		if len(msg) > maxEchoedName+64 || !utf8.Valid(msg) || bytes.ContainsAny(msg, "\x00\x1b\n") {
			t.Errorf("%s: error message of %d bytes, valid UTF-8 %v: %.80q...", what, len(msg), utf8.Valid(msg), msg)
		}
		if !strings.Contains(string(msg), "unknown export") {
			t.Errorf("%s: error message %q does not say what is wrong", what, msg)
		}
	}
	r := dialHandshake(t, sock)
	for _, name := range []string{long, odd} {
		for _, opt := range []uint32{optInfo, optGo} {
			r.option(opt, nameQuery(name, []byte{0, 0}))
			typ, msg := r.optReply(opt)
			if typ != repErrUnknown {
				t.Fatalf("option %d on an unknown export: reply %#x", opt, typ)
			}
			checkMsg("INFO/GO", msg)
		}
		for _, opt := range []uint32{optListMetaContext, optSetMetaContext} {
			r.option(opt, nameQuery(name, []byte{0, 0, 0, 0}))
			typ, msg := r.optReply(opt)
			if typ&repErrBit == 0 {
				t.Fatalf("option %d on an unknown export: reply %#x", opt, typ)
			}
			if typ == repErrUnknown {
				checkMsg("META_CONTEXT", msg)
			}
		}
	}
	// The handshake is still in step.
	goStructured(t, r, "")

	// libnbd accepts the error reply and can go on negotiating.
	out := libnbd(t, `
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.set_export_name("x" * 4096)
try:
    h.opt_go()
    raise SystemExit("opt_go on an unknown export succeeded")
except nbd.Error as e:
    assert h.aio_is_negotiating(), "the connection died: %s" % e
    assert e.errnum == errno.ENOENT, e
h.set_export_name("")
h.opt_go()
assert h.get_size() == 1 << 20
print("ok")
`, uri(sock, ""))
	if out != "ok" {
		t.Fatalf("libnbd: %s", out)
	}
}

// Command flags the spec does not define for a command, or that were not
// negotiated, are refused with EINVAL; the defined ones still work.
func TestUnknownCommandFlagsAreRefused(t *testing.T) {
	plain := memdev.New(1 << 20) // no fast zero
	fast := capsDev{memdev.New(1 << 20), blockdev.Caps{Flush: true, Trim: true, WriteZeroes: true, FastZero: true, Prefetch: true}}
	ro := memdev.FromBytes(make([]byte, 1<<20), true)
	sock := serveDevs(t, map[string]blockdev.Device{"plain": plain, "fast": fast, "ro": ro})
	const unknown = 1 << 7
	cases := []struct {
		export string
		typ    uint16
		flags  uint16
		ok     bool
	}{
		{"plain", cmdRead, unknown, false},
		{"plain", cmdRead, 1 << 15, false},
		{"plain", cmdRead, cmdFlagFUA, true}, // FUA is valid on every command once negotiated
		{"plain", cmdRead, cmdFlagDF, false}, // DF needs structured replies
		{"plain", cmdRead, cmdFlagReqOne, false},
		{"plain", cmdWrite, cmdFlagFUA, true},
		{"plain", cmdWrite, cmdFlagNoHole, false},
		{"plain", cmdWrite, unknown, false},
		{"plain", cmdTrim, cmdFlagFUA, true},
		{"plain", cmdTrim, cmdFlagNoHole, false},
		{"plain", cmdFlush, 0, true},
		{"plain", cmdFlush, cmdFlagReqOne, false},
		{"plain", cmdWriteZeroes, cmdFlagNoHole | cmdFlagFUA, true},
		{"plain", cmdWriteZeroes, cmdFlagFastZero, false}, // not advertised
		{"plain", cmdWriteZeroes, cmdFlagDF, false},
		{"fast", cmdWriteZeroes, cmdFlagFastZero | cmdFlagNoHole, true},
		{"plain", cmdCache, cmdFlagNoHole, false},
		{"ro", cmdRead, cmdFlagFUA, false}, // FUA not advertised on a read-only export
		{"ro", cmdRead, 0, true},
	}
	conns := map[string]*rawClient{}
	for i, tc := range cases {
		c := conns[tc.export]
		if c == nil {
			c = dialRaw(t, sock, tc.export)
			conns[tc.export] = c
		}
		var payload []byte
		if tc.typ == cmdWrite {
			payload = make([]byte, 4096)
		}
		c.send(tc.typ, tc.flags, uint64(i), 0, 4096, payload)
		dataLen := 0
		if tc.typ == cmdRead {
			dataLen = 4096
		}
		errno, cookie, _ := c.reply(dataLen)
		if cookie != uint64(i) || (tc.ok && errno != 0) || (!tc.ok && errno != errInval) {
			t.Errorf("case %d: %s command %d flags %#x: errno %d cookie %d, want ok=%v (else EINVAL)", i, tc.export, tc.typ, tc.flags, errno, cookie, tc.ok)
		}
	}
	// With structured replies: DF is valid on READ, REQ_ONE on BLOCK_STATUS,
	// and nowhere else.
	r := dialHandshake(t, sock)
	r.option(optStructuredReply, nil)
	r.optReply(optStructuredReply)
	setMeta(t, r, "plain")
	goStructured(t, r, "plain")
	for i, tc := range []struct {
		typ, flags uint16
		ok         bool
	}{
		{cmdRead, cmdFlagDF, true},
		{cmdRead, cmdFlagDF | unknown, false},
		{cmdBlockStatus, cmdFlagReqOne, true},
		{cmdBlockStatus, cmdFlagDF, false},
		{cmdBlockStatus, unknown, false},
	} {
		r.send(tc.typ, tc.flags, uint64(i), 0, 4096, nil)
		_, typ, cookie, p := r.chunk()
		isErr := typ == replyTypeError
		if cookie != uint64(i) || isErr == tc.ok || (isErr && binary.BigEndian.Uint32(p) != errInval) {
			t.Errorf("structured case %d: command %d flags %#x: chunk type %d cookie %d payload %.40q", i, tc.typ, tc.flags, typ, cookie, p)
		}
	}

	// libnbd, told not to check flags itself, gets EINVAL back and the
	// connection goes on.
	out := libnbd(t, `
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
def refused(f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
        return
    raise SystemExit("%s%r succeeded" % (f.__name__, args))
refused(h.pread, 4096, 0, 1 << 7)
refused(h.pwrite, b"x" * 4096, 0, 1 << 9)
refused(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
refused(h.trim, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
refused(h.flush, nbd.CMD_FLAG_DF)
assert h.pread(4096, 0, nbd.CMD_FLAG_DF) == bytes(4096)
h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == b"y" * 4096
print("ok")
`, uri(sock, "plain"))
	if out != "ok" {
		t.Fatalf("libnbd: %s", out)
	}
}

// An option too long to be valid is skipped without being stored and
// answered NBD_REP_ERR_TOO_BIG, and negotiation goes on; an absurd one,
// or an over-long EXPORT_NAME (which cannot be answered with an error),
// ends the connection at once, without the server reading the data.
func TestOversizedOptions(t *testing.T) {
	sock := serveDevs(t, map[string]blockdev.Device{"": memdev.New(1 << 20)})
	r := dialHandshake(t, sock)
	for _, opt := range []uint32{optGo, optInfo, optListMetaContext, optList, 99} {
		data := make([]byte, maxOptionLen+1)
		binary.BigEndian.PutUint32(data, 4) // looks like a name at first
		r.option(opt, data)
		typ, msg := r.optReply(opt)
		if typ != repErrTooBig || !utf8.Valid(msg) || len(msg) == 0 {
			t.Fatalf("option %d of %d bytes: reply %#x %q, want NBD_REP_ERR_TOO_BIG", opt, len(data), typ, msg)
		}
	}
	// A long option just under the bound is read and judged on its content.
	r.option(optList, make([]byte, maxOptionLen))
	if typ, _ := r.optReply(optList); typ != repErrInvalid {
		t.Fatalf("LIST with %d bytes of data: reply %#x, want NBD_REP_ERR_INVALID", maxOptionLen, typ)
	}
	goStructured(t, r, "")
	r.send(cmdRead, 0, 1, 0, 4, nil)
	if _, typ, cookie, _ := r.chunk(); typ != replyTypeOffsetData || cookie != 1 {
		t.Fatalf("read after oversized options: type %d cookie %d", typ, cookie)
	}

	ended := func(what string, r *rawClient) {
		t.Helper()
		r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := r.c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("%s: read %d %v, want EOF", what, n, err)
		}
	}
	// Absurd: only the header is sent; the server must not wait for 3 GiB.
	r = dialHandshake(t, sock)
	h := binary.BigEndian.AppendUint64(nil, magicOpt)
	h = binary.BigEndian.AppendUint32(h, optInfo)
	h = binary.BigEndian.AppendUint32(h, 3<<30)
	r.c.Write(h)
	ended("a 3 GiB option", r)
	// EXPORT_NAME cannot be refused with an error reply.
	r = dialHandshake(t, sock)
	r.option(optExportName, bytes.Repeat([]byte("n"), maxNameLen+1))
	ended("EXPORT_NAME longer than any export name", r)
}

// noZero advertises fast zeroing, but its device cannot zero at all.
type noZero struct{ capsDev }

func (noZero) WriteZeroes(off, length int64) error { return blockdev.ErrUnsupported }

// A device's "not supported" is ENOTSUP with structured replies (the code
// is only defined for them) and EINVAL without.
func TestUnsupportedOperationIsENOTSUP(t *testing.T) {
	dev := noZero{capsDev{memdev.New(1 << 20), blockdev.Caps{WriteZeroes: true, FastZero: true}}}
	sock := serveDevs(t, map[string]blockdev.Device{"": dev})
	r := dialHandshake(t, sock)
	goStructured(t, r, "")
	r.send(cmdWriteZeroes, cmdFlagFastZero, 4, 0, 4096, nil)
	if _, typ, cookie, p := r.chunk(); typ != replyTypeError || cookie != 4 || binary.BigEndian.Uint32(p) != errNotSup {
		t.Fatalf("fast zero: type %d cookie %d payload %q", typ, cookie, p)
	}
	c := dialRaw(t, sock, "")
	c.send(cmdWriteZeroes, cmdFlagFastZero, 5, 0, 4096, nil)
	if errno, cookie, _ := c.reply(0); errno != errInval || cookie != 5 {
		t.Fatalf("fast zero with simple replies: errno %d cookie %d, want EINVAL", errno, cookie)
	}
}

// Clients that connect and never finish negotiating are bounded: past
// the bound new connections are closed at once; once the others are
// done, clients get in again.
func TestNegotiatingClientsAreBounded(t *testing.T) {
	srv, sock := serveWith(t, nil, map[string]blockdev.Device{"": memdev.New(1 << 20)})
	srv.mu.Lock()
	srv.maxHandshakes = 3
	srv.mu.Unlock()
	var idle []*rawClient
	for range 3 {
		idle = append(idle, dialHandshake(t, sock)) // greeted, then silent
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 18)); err != io.EOF {
		t.Fatalf("a fourth negotiating client: read %d %v, want EOF", n, err)
	}
	for _, r := range idle {
		r.c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		srv.mu.Lock()
		n := len(srv.pending)
		srv.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d clients still negotiating after they left", n)
		}
		time.Sleep(time.Millisecond)
	}
	out := run(t, "nbdinfo", uri(sock, ""))
	if !strings.Contains(out, "export-size: 1048576") {
		t.Fatalf("nbdinfo after the idle clients left:\n%s", out)
	}
}
