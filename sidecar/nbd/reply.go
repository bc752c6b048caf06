package nbd

import (
	"encoding/binary"
	"math/bits"
	"net"
	"runtime"
	"sync"
)

// reply is one encoded reply: a header (simple, or structured chunk header
// plus its fixed prefix) and an optional payload.
type reply struct {
	head    [28]byte
	headLen uint8
	pooled  bool  // data comes from getBuf and goes back after the write
	cost    int64 // memory budget the request holds until the write
	data    []byte
}

func simpleReply(cookie uint64, errno uint32, data []byte, pooled bool) reply {
	r := reply{headLen: 16, data: data, pooled: pooled}
	binary.BigEndian.PutUint32(r.head[0:], magicSimple)
	binary.BigEndian.PutUint32(r.head[4:], errno)
	binary.BigEndian.PutUint64(r.head[8:], cookie)
	return r
}

// chunkReply is a structured chunk with the DONE flag (we never split a
// reply). prefix is at most 8 bytes of fixed fields before data.
func chunkReply(cookie uint64, typ uint16, prefix []byte, data []byte, pooled bool) reply {
	r := reply{headLen: uint8(20 + len(prefix)), data: data, pooled: pooled}
	binary.BigEndian.PutUint32(r.head[0:], magicStructured)
	binary.BigEndian.PutUint16(r.head[4:], replyFlagDone)
	binary.BigEndian.PutUint16(r.head[6:], typ)
	binary.BigEndian.PutUint64(r.head[8:], cookie)
	binary.BigEndian.PutUint32(r.head[16:], uint32(len(prefix)+len(data)))
	copy(r.head[20:], prefix)
	return r
}

// maxBatch bounds how many replies share one writev.
const maxBatch = 64

// writeLoop is the connection's only writer. It sends whatever replies are
// queued in one writev, so a busy connection costs fewer syscalls and
// client wakeups than replies. After a write error it keeps draining the
// queue (returning buffers) so workers never block.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	batch := make([]reply, 0, maxBatch)
	iov := make(net.Buffers, 0, 2*maxBatch)
	failed := false
	for r := range c.replies {
		batch = append(batch[:0], r)
		c.gather(&batch)
		if len(batch) < maxBatch && c.pending.Load() > int32(len(batch)) {
			// Other requests are running: let them finish first so
			// their replies share this write.
			runtime.Gosched()
			c.gather(&batch)
		}
		if !failed {
			iov = iov[:0]
			for i := range batch {
				iov = append(iov, batch[i].head[:batch[i].headLen])
				if len(batch[i].data) > 0 {
					iov = append(iov, batch[i].data)
				}
			}
			out := iov // WriteTo consumes the slice it is called on
			if _, err := out.WriteTo(c.nc); err != nil {
				failed = true
				c.log.WithError(err).Debug("nbd: writing replies failed")
				c.shutdown()
			}
		}
		c.pending.Add(-int32(len(batch)))
		for i := range batch {
			if batch[i].pooled {
				c.putBuf(batch[i].data)
			}
			c.release(batch[i].cost)
			batch[i] = reply{}
		}
	}
}

// gather adds the replies already queued to batch, without waiting.
func (c *conn) gather(batch *[]reply) {
	for len(*batch) < maxBatch {
		select {
		case r, ok := <-c.replies:
			if !ok {
				return
			}
			*batch = append(*batch, r)
		default:
			return
		}
	}
}

// Buffers come from per-power-of-two pools (4 KiB up) so a busy connection
// does not allocate per request.
var bufPools [14]sync.Pool // up to 32 MiB, the default maximum block

func poolIndex(n int) int {
	if n <= 4096 {
		return 0
	}
	return bits.Len(uint(n-1)) - 12
}

// bufCap is the capacity getBuf(n) returns: the memory n bytes take.
func bufCap(n int) int {
	if i := poolIndex(n); i < len(bufPools) {
		return 4096 << i
	}
	return n
}

func getBuf(n int) []byte {
	i := poolIndex(n)
	if i >= len(bufPools) {
		return make([]byte, n)
	}
	if b, ok := bufPools[i].Get().([]byte); ok {
		return b[:n]
	}
	return make([]byte, n, 4096<<i)
}

func putBuf(b []byte) {
	i := poolIndex(cap(b))
	if i >= len(bufPools) || cap(b) != 4096<<i {
		return
	}
	bufPools[i].Put(b[:cap(b)]) // boxing the header costs 24 bytes, far less than the buffer
}
