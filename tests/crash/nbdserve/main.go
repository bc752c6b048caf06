// Command nbdserve is a stand-in for `vmthunder export` in the crash tests
// while the real NBD server is not built: the smallest fixed-newstyle NBD
// server (one request at a time) over stack.Build, with the same flags
// (--socket, --cache, --chunk-size, --cow, --write-through SOURCE).
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

func main() {
	sock := flag.String("socket", "", "unix socket")
	cacheDir := flag.String("cache", "", "cache dir")
	chunk := flag.Int64("chunk-size", 0, "chunk size")
	cow := flag.String("cow", "", "cow store")
	wt := flag.Bool("write-through", false, "write-through")
	flag.Parse()
	mode := stack.ModeDirect
	switch {
	case *cow != "":
		mode = stack.ModeCOW
	case *wt:
		mode = stack.ModeWriteThrough
	case *cacheDir != "":
		mode = stack.ModeReadOnly
	}
	dev, err := stack.Build(stack.Options{Origin: origin.Spec{URL: flag.Arg(0)}, Mode: mode,
		CacheDir: *cacheDir, ChunkSize: *chunk, CowPath: *cow})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	l, err := net.Listen("unix", *sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(1)
		}
		go serve(c, dev)
	}
}

var be = binary.BigEndian

func serve(c net.Conn, d blockdev.Device) {
	defer c.Close()
	hdr := make([]byte, 18)
	be.PutUint64(hdr, 0x4e42444d41474943)
	be.PutUint64(hdr[8:], 0x49484156454f5054)
	be.PutUint16(hdr[16:], 3) // fixed newstyle, no zeroes
	c.Write(hdr)
	var cflags uint32
	if binary.Read(c, be, &cflags) != nil {
		return
	}
	caps := d.Caps()
	tflags := uint16(1 | 4 | 8 | 32 | 64 | 256)
	if caps.ReadOnly {
		tflags |= 2
	}
	for { // options
		var o struct {
			Magic     uint64
			Opt, Size uint32
		}
		if binary.Read(c, be, &o) != nil {
			return
		}
		data := make([]byte, o.Size)
		if _, err := io.ReadFull(c, data); err != nil {
			return
		}
		reply := func(typ uint32, p []byte) {
			b := make([]byte, 20, 20+len(p))
			be.PutUint64(b, 0x3e889045565a9)
			be.PutUint32(b[8:], o.Opt)
			be.PutUint32(b[12:], typ)
			be.PutUint32(b[16:], uint32(len(p)))
			c.Write(append(b, p...))
		}
		switch o.Opt {
		case 1: // EXPORT_NAME
			b := make([]byte, 10)
			be.PutUint64(b, uint64(d.Size()))
			be.PutUint16(b[8:], tflags)
			c.Write(b)
			transmit(c, d)
			return
		case 2: // ABORT
			reply(1, nil)
			return
		case 6, 7: // INFO, GO
			b := make([]byte, 12)
			be.PutUint64(b[2:], uint64(d.Size()))
			be.PutUint16(b[10:], tflags)
			reply(3, b)
			reply(1, nil)
			if o.Opt == 7 {
				transmit(c, d)
				return
			}
		default:
			reply(1<<31|1, nil)
		}
	}
}

func errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, blockdev.ErrReadOnly):
		return 1
	case errors.Is(err, blockdev.ErrNoSpace):
		return 28
	case errors.Is(err, blockdev.ErrOutOfRange), errors.Is(err, blockdev.ErrInvalid), errors.Is(err, blockdev.ErrUnsupported):
		return 22
	}
	return 5
}

func transmit(c net.Conn, d blockdev.Device) {
	for {
		var r struct {
			Magic       uint32
			Flags, Type uint16
			Handle      uint64
			Off         uint64
			Len         uint32
		}
		if binary.Read(c, be, &r) != nil {
			return
		}
		var err error
		var out []byte
		off, n := int64(r.Off), int64(r.Len)
		switch r.Type {
		case 0:
			out = make([]byte, n)
			_, err = d.ReadAt(out, off)
		case 1:
			p := make([]byte, n)
			if _, err = io.ReadFull(c, p); err != nil {
				return
			}
			_, err = d.WriteAt(p, off)
		case 2:
			return
		case 3:
			err = d.Flush()
		case 4:
			err = d.Trim(off, n)
		case 5:
			err = d.Prefetch(off, n)
		case 6:
			err = d.WriteZeroes(off, n)
		default:
			err = blockdev.ErrInvalid
		}
		if err == nil && r.Flags&1 != 0 && r.Type != 0 { // FUA
			err = d.Flush()
		}
		b := make([]byte, 16, 16+len(out))
		be.PutUint32(b, 0x67446698)
		be.PutUint32(b[4:], errno(err))
		be.PutUint64(b[8:], r.Handle)
		if err == nil {
			b = append(b, out...)
		}
		if _, err := c.Write(b); err != nil {
			return
		}
	}
}
