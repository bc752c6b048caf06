package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev/memdev"
)

// FuzzDecodeRequest: the decoder never panics and round-trips what it accepts.
func FuzzDecodeRequest(f *testing.F) {
	seed := func(typ uint16, flags uint16, off uint64, length uint32) []byte {
		b := binary.BigEndian.AppendUint32(nil, magicRequest)
		b = binary.BigEndian.AppendUint16(b, flags)
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint64(b, 42)
		b = binary.BigEndian.AppendUint64(b, off)
		return binary.BigEndian.AppendUint32(b, length)
	}
	f.Add(seed(cmdRead, 0, 0, 4096))
	f.Add(seed(cmdWrite, cmdFlagFUA, 1<<40, 1))
	f.Add(seed(cmdBlockStatus, cmdFlagReqOne, 0, ^uint32(0)))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRequest(b)
		if err != nil {
			return
		}
		again := seed(r.typ, r.flags, r.offset, r.length)
		binary.BigEndian.PutUint64(again[8:], r.cookie)
		if !bytes.Equal(again, b[:requestSize]) {
			t.Fatalf("decode/encode mismatch: %x vs %x", again, b[:requestSize])
		}
	})
}

// FuzzHandshake feeds arbitrary option bytes to the handshake: it must end
// in an error or a session, never a panic or a hang.
func FuzzHandshake(f *testing.F) {
	opt := func(o uint32, data []byte) []byte {
		b := binary.BigEndian.AppendUint64(nil, magicOpt)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	flags := binary.BigEndian.AppendUint32(nil, handshakeFixed)
	f.Add(append(flags, opt(optGo, []byte{0, 0, 0, 0, 0, 0})...))
	f.Add(append(append(flags, opt(optStructuredReply, nil)...), opt(optSetMetaContext, []byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15, 'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n'})...))
	f.Add(append(flags, opt(optList, nil)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		log := logrus.New()
		log.SetOutput(bytes.NewBuffer(nil))
		s := NewServer(log)
		s.Add("", memdev.New(4096))
		var out bytes.Buffer
		s.handshake(bufio.NewReader(bytes.NewReader(in)), bufio.NewWriter(&out))
	})
}

// FuzzTransmission feeds arbitrary requests (after a handshake with or
// without structured replies) to a connection: every request is answered
// or ends the connection, never a panic or a hang, and every byte of the
// memory budgets comes back.
func FuzzTransmission(f *testing.F) {
	req := func(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, magicRequest)
		b = binary.BigEndian.AppendUint16(b, flags)
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint64(b, 7)
		b = binary.BigEndian.AppendUint64(b, off)
		b = binary.BigEndian.AppendUint32(b, length)
		return append(b, payload...)
	}
	f.Add(false, req(cmdRead, 0, 0, 4096, nil))
	f.Add(true, append(req(cmdWrite, cmdFlagFUA, 512, 8, []byte("abcdefgh")), req(cmdRead, cmdFlagDF, 512, 8, nil)...))
	f.Add(true, append(req(cmdBlockStatus, cmdFlagReqOne, 0, 1<<20, nil), req(cmdTrim, 0, 0, 0, nil)...))
	f.Add(false, append(req(cmdWriteZeroes, cmdFlagFastZero|cmdFlagNoHole, 0, 4096, nil), req(cmdCache, 1<<9, 0, 4096, nil)...))
	f.Add(true, req(cmdWrite, 0, 0, 3<<20, make([]byte, 100)))
	f.Add(false, append(req(cmdRead, 0, 0, 1<<20, nil), req(cmdDisc, 0, 0, 0, nil)...))
	f.Fuzz(func(t *testing.T, structured bool, in []byte) {
		log := logrus.New()
		log.SetOutput(io.Discard)
		s := NewServer(log, WithMemoryLimits(1<<20, 256<<10))
		s.Add("", memdev.New(1<<20))
		client, server := net.Pipe()
		served := make(chan struct{})
		go func() {
			s.serveConn(server)
			close(served)
		}()
		go io.Copy(io.Discard, client) // replies
		hs := binary.BigEndian.AppendUint32(nil, handshakeFixed|handshakeNoZeros)
		opt := func(o uint32, data []byte) {
			hs = binary.BigEndian.AppendUint64(hs, magicOpt)
			hs = binary.BigEndian.AppendUint32(hs, o)
			hs = binary.BigEndian.AppendUint32(hs, uint32(len(data)))
			hs = append(hs, data...)
		}
		if structured {
			opt(optStructuredReply, nil)
			opt(optSetMetaContext, []byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15, 'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n'})
			opt(optGo, []byte{0, 0, 0, 0, 0, 0})
		} else {
			opt(optExportName, nil)
		}
		client.SetWriteDeadline(time.Now().Add(10 * time.Second))
		client.Write(append(hs, in...))
		client.Close()
		select {
		case <-served:
		case <-time.After(10 * time.Second):
			t.Fatal("the connection did not end after the client left")
		}
		if s.budget.InUse() != 0 || s.held.cur.Load() != 0 {
			t.Fatalf("after the connection: budget %d in use, %d bytes held", s.budget.InUse(), s.held.cur.Load())
		}
	})
}
