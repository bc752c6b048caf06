package nbd

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// rawClient speaks just enough NBD to check the wire format and to send
// requests that well-behaved clients never send.
type rawClient struct {
	t *testing.T
	c net.Conn
}

// dialHandshake connects and sends the client flags; options come next.
func dialHandshake(t *testing.T, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	hello := make([]byte, 18)
	if _, err := io.ReadFull(c, hello); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint64(hello) != magicInit || binary.BigEndian.Uint64(hello[8:]) != magicOpt {
		t.Fatalf("bad greeting %x", hello)
	}
	if flags := binary.BigEndian.Uint16(hello[16:]); flags != handshakeFixed|handshakeNoZeros {
		t.Fatalf("handshake flags %#x, want fixed newstyle and no zeroes", flags)
	}
	c.Write(binary.BigEndian.AppendUint32(nil, handshakeFixed|handshakeNoZeros))
	return &rawClient{t, c}
}

// dialRaw opens export name with EXPORT_NAME: simple replies only.
func dialRaw(t *testing.T, sock, name string) *rawClient {
	t.Helper()
	r := dialHandshake(t, sock)
	r.option(optExportName, []byte(name))
	info := make([]byte, 10)
	if _, err := io.ReadFull(r.c, info); err != nil {
		t.Fatalf("export %q: %v", name, err)
	}
	return r
}

func (r *rawClient) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	r.c.Write(append(b, data...))
}

// optReply reads one option reply and checks it answers opt.
func (r *rawClient) optReply(opt uint32) (typ uint32, data []byte) {
	r.t.Helper()
	h := make([]byte, 20)
	if _, err := io.ReadFull(r.c, h); err != nil {
		r.t.Fatalf("option %d reply: %v", opt, err)
	}
	if binary.BigEndian.Uint64(h) != magicOptReply || binary.BigEndian.Uint32(h[8:]) != opt {
		r.t.Fatalf("bad option reply header %x for option %d", h, opt)
	}
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(r.c, data); err != nil {
		r.t.Fatal(err)
	}
	return binary.BigEndian.Uint32(h[12:]), data
}

func (r *rawClient) send(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	r.c.Write(append(b, payload...))
}

// reply reads a simple reply and, if ok and dataLen > 0, its data.
func (r *rawClient) reply(dataLen int) (errno uint32, cookie uint64, data []byte) {
	r.t.Helper()
	h := make([]byte, 16)
	if _, err := io.ReadFull(r.c, h); err != nil {
		r.t.Fatal(err)
	}
	if binary.BigEndian.Uint32(h) != magicSimple {
		r.t.Fatalf("bad reply magic %x", h[:4])
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && dataLen > 0 {
		data = make([]byte, dataLen)
		if _, err := io.ReadFull(r.c, data); err != nil {
			r.t.Fatal(err)
		}
	}
	return
}

// chunk reads one structured reply chunk.
func (r *rawClient) chunk() (flags, typ uint16, cookie uint64, payload []byte) {
	r.t.Helper()
	h := make([]byte, 20)
	if _, err := io.ReadFull(r.c, h); err != nil {
		r.t.Fatal(err)
	}
	if binary.BigEndian.Uint32(h) != magicStructured {
		r.t.Fatalf("bad structured reply magic %x", h[:4])
	}
	payload = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(r.c, payload); err != nil {
		r.t.Fatal(err)
	}
	return binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]), binary.BigEndian.Uint64(h[8:]), payload
}

func nameQuery(name string, tail []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	return append(append(b, name...), tail...)
}

// capsDev overrides a device's capabilities.
type capsDev struct {
	blockdev.Device
	caps blockdev.Caps
}

func (d capsDev) Caps() blockdev.Caps { return d.caps }

func TestHandshakeOptionsAndStructuredReplies(t *testing.T) {
	dev := memdev.New(2 << 20)
	copy(dev.Bytes(), "hello")
	sock := serveDevs(t, map[string]blockdev.Device{
		"disk": failing{dev},
		"single": capsDev{memdev.New(4096), blockdev.Caps{Flush: true, WriteZeroes: true, FastZero: true,
			MinBlock: 512, PreferredBlock: 65536, MaxBlock: 1 << 20}},
	})
	r := dialHandshake(t, sock)

	r.option(99, nil)
	if typ, _ := r.optReply(99); typ != repErrUnsup {
		t.Fatalf("unknown option: reply %#x, want NBD_REP_ERR_UNSUP", typ)
	}
	r.option(optStartTLS, nil)
	if typ, _ := r.optReply(optStartTLS); typ != repErrUnsup {
		t.Fatalf("STARTTLS: reply %#x, want NBD_REP_ERR_UNSUP", typ)
	}
	r.option(optInfo, nameQuery("nope", []byte{0, 0}))
	if typ, msg := r.optReply(optInfo); typ != repErrUnknown {
		t.Fatalf("INFO of an unknown export: reply %#x %q, want NBD_REP_ERR_UNKNOWN", typ, msg)
	}
	r.option(optList, nil)
	var names []string
	for {
		typ, data := r.optReply(optList)
		if typ == repAck {
			break
		}
		if typ != repServer {
			t.Fatalf("LIST reply %#x", typ)
		}
		names = append(names, string(data[4:4+binary.BigEndian.Uint32(data)]))
	}
	if len(names) != 2 || names[0] != "disk" || names[1] != "single" {
		t.Fatalf("LIST = %q", names)
	}
	metaQuery := nameQuery("disk", append(binary.BigEndian.AppendUint32(nil, 1), nameQuery(baseAllocation, nil)...))
	r.option(optSetMetaContext, metaQuery)
	if typ, _ := r.optReply(optSetMetaContext); typ != repErrInvalid {
		t.Fatalf("SET_META_CONTEXT before STRUCTURED_REPLY: reply %#x, want NBD_REP_ERR_INVALID", typ)
	}
	r.option(optStructuredReply, nil)
	if typ, _ := r.optReply(optStructuredReply); typ != repAck {
		t.Fatalf("STRUCTURED_REPLY: reply %#x", typ)
	}
	r.option(optSetMetaContext, metaQuery)
	typ, data := r.optReply(optSetMetaContext)
	if typ != repMetaContext || binary.BigEndian.Uint32(data) != baseAllocationID || string(data[4:]) != baseAllocation {
		t.Fatalf("SET_META_CONTEXT: reply %#x %q", typ, data)
	}
	if typ, _ := r.optReply(optSetMetaContext); typ != repAck {
		t.Fatalf("SET_META_CONTEXT end: reply %#x", typ)
	}

	// INFO on the export with its own block sizes and no multi-conn.
	r.option(optInfo, nameQuery("single", []byte{0, 2, 0, infoBlockSize, 0, infoName}))
	got := map[uint16][]byte{}
	for {
		typ, data := r.optReply(optInfo)
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("INFO reply %#x %q", typ, data)
		}
		got[binary.BigEndian.Uint16(data)] = data[2:]
	}
	if string(got[infoName]) != "single" {
		t.Errorf("INFO_NAME = %q", got[infoName])
	}
	bs := got[infoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 512 || binary.BigEndian.Uint32(bs[4:]) != 65536 || binary.BigEndian.Uint32(bs[8:]) != 1<<20 {
		t.Errorf("INFO_BLOCK_SIZE = %x", bs)
	}
	exp := got[infoExport]
	wantFlags := uint16(flagHasFlags | flagSendDF | flagSendFUA | flagSendFlush | flagSendZeroes | flagSendFastZero)
	if len(exp) != 10 || binary.BigEndian.Uint64(exp) != 4096 || binary.BigEndian.Uint16(exp[8:]) != wantFlags {
		t.Errorf("INFO_EXPORT = %x, want size 4096 flags %#x", exp, wantFlags)
	}

	// GO on the default-sized export, then structured transmission.
	r.option(optGo, nameQuery("disk", []byte{0, 0}))
	for {
		typ, data := r.optReply(optGo)
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("GO reply %#x %q", typ, data)
		}
		if binary.BigEndian.Uint16(data) == infoExport && binary.BigEndian.Uint16(data[10:])&flagMultiConn == 0 {
			t.Errorf("memdev export does not advertise multi-conn: flags %#x", binary.BigEndian.Uint16(data[10:]))
		}
	}

	r.send(cmdRead, 0, 1, 0, 5, nil)
	if flags, typ, cookie, p := r.chunk(); flags != replyFlagDone || typ != replyTypeOffsetData || cookie != 1 ||
		binary.BigEndian.Uint64(p) != 0 || string(p[8:]) != "hello" {
		t.Fatalf("structured read: flags %d type %d cookie %d payload %q", flags, typ, cookie, p)
	}
	// failing{} fails reads past 1 MiB: an error chunk with EIO and a message.
	r.send(cmdRead, 0, 2, 1<<20, 4096, nil)
	if flags, typ, cookie, p := r.chunk(); flags != replyFlagDone || typ != replyTypeError || cookie != 2 ||
		binary.BigEndian.Uint32(p) != errIO || string(p[6:]) != "injected media error" {
		t.Fatalf("failed read: flags %d type %d cookie %d payload %q", flags, typ, cookie, p)
	}
	r.send(cmdBlockStatus, cmdFlagReqOne, 3, 4096, 8192, nil)
	if _, typ, cookie, p := r.chunk(); typ != replyTypeBlockStatus || cookie != 3 || len(p) != 12 ||
		binary.BigEndian.Uint32(p) != baseAllocationID || binary.BigEndian.Uint32(p[4:]) != 8192 || binary.BigEndian.Uint32(p[8:]) != 0 {
		t.Fatalf("block status: type %d cookie %d payload %x", typ, cookie, p)
	}
	// FAST_ZERO was not advertised for this export: the spec asks for
	// EINVAL (TestUnsupportedOperationIsENOTSUP has the ENOTSUP case).
	r.send(cmdWriteZeroes, cmdFlagFastZero, 4, 0, 4096, nil)
	if _, typ, cookie, p := r.chunk(); typ != replyTypeError || cookie != 4 || binary.BigEndian.Uint32(p) != errInval {
		t.Fatalf("fast zero: type %d cookie %d payload %q", typ, cookie, p)
	}
	r.send(cmdDisc, 0, 5, 0, 0, nil)
	if n, err := r.c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after DISC: read %d %v, want EOF", n, err)
	}
}

func TestBadRequestsGetErrorsAndStreamStaysInStep(t *testing.T) {
	dev := memdev.New(2 << 20)
	copy(dev.Bytes(), "hello")
	sock := serveDevs(t, map[string]blockdev.Device{"": failing{dev}, "ro": memdev.FromBytes(make([]byte, 4096), true)})
	c := dialRaw(t, sock, "")
	cases := []struct {
		typ     uint16
		off     uint64
		length  uint32
		payload []byte
		want    uint32
	}{
		{cmdRead, 2 << 20, 4096, nil, errInval},                 // past the end
		{cmdRead, 1 << 20, 4096, nil, errIO},                    // device error, simple reply
		{cmdWrite, 2<<20 - 2, 4, []byte("abcd"), errNoSpc},      // write past the end
		{cmdWrite, 0, 64 << 20, make([]byte, 64<<20), errInval}, // over max block: drained
		{99, 0, 0, nil, errInval},                               // unknown command
		{cmdBlockStatus, 0, 4096, nil, errInval},                // not negotiated
		{cmdRead, 1<<64 - 1, 1, nil, errInval},                  // offset overflow
	}
	for i, tc := range cases {
		c.send(tc.typ, 0, uint64(i+1), tc.off, tc.length, tc.payload)
		errno, cookie, _ := c.reply(0)
		if errno != tc.want || cookie != uint64(i+1) {
			t.Errorf("case %d: errno %d cookie %d, want errno %d cookie %d", i, errno, cookie, tc.want, i+1)
		}
	}
	// The stream is still in step: a good read works.
	c.send(cmdRead, 0, 77, 0, 5, nil)
	if errno, cookie, data := c.reply(5); errno != 0 || cookie != 77 || string(data) != "hello" {
		t.Fatalf("read after bad requests: errno %d cookie %d data %q", errno, cookie, data)
	}
	ro := dialRaw(t, sock, "ro")
	for i, typ := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
		var payload []byte
		if typ == cmdWrite {
			payload = []byte("abcd")
		}
		ro.send(typ, 0, uint64(i), 0, 4, payload)
		if errno, _, _ := ro.reply(0); errno != errPerm {
			t.Fatalf("command %d on a read-only export: errno %d, want EPERM", typ, errno)
		}
	}
	// A bad magic ends the connection: there is no way to resynchronise.
	c.c.Write(make([]byte, requestSize))
	if n, err := c.c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after a bad magic: read %d %v, want EOF", n, err)
	}
}
