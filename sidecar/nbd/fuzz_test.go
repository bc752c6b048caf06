package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"testing"

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
