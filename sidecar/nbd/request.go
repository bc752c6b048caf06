package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// requestSize is the size of a (compact) transmission request header.
const requestSize = 28

// request is one decoded transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

var errBadMagic = errors.New("nbd: bad request magic")

// decodeRequest parses a request header. Only a wrong magic is fatal for
// the connection: anything else is answered per request.
func decodeRequest(b []byte) (request, error) {
	if len(b) < requestSize {
		return request{}, fmt.Errorf("nbd: short request header (%d bytes)", len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return request{}, fmt.Errorf("%w %#x", errBadMagic, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		cookie: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

func (r request) String() string {
	return fmt.Sprintf("cmd %d flags %#x offset %d length %d", r.typ, r.flags, r.offset, r.length)
}
