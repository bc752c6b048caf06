// Package iscsi is the origin for a Cinder iSCSI volume, read and written
// in user space with libiscsi (the initiator QEMU uses), so no kernel iSCSI
// session exists and a storage fault cannot wedge the host kernel.
//
// A Dev keeps one or more sessions (Spec.Sessions), each a libiscsi
// context driven asynchronously by its own goroutine with many commands in
// flight, and spreads commands over them by load. When a session drops, its commands are retried on the
// others while it logs in again, trying the next portal first; the reader
// sees an error only when no portal answers for Spec.RetryTimeout.
package iscsi

/*
#include "vt.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/blockdev"
)

// maxXfer caps one SCSI command; larger I/O is split and the pieces run in
// parallel over the sessions.
const maxXfer = 1 << 20

// Dev is an iSCSI LUN as a blockdev.Device.
type Dev struct {
	spec      Spec
	blockSize int64
	size      atomic.Int64
	lbpme     bool
	conns     []*conn

	upMu   sync.Mutex
	upCh   chan struct{} // closed and replaced when a session comes up
	rmwMu  sync.Mutex    // serialises read-modify-write of partial blocks
	closed atomic.Bool
	once   sync.Once
}

// OpenURL opens an iscsi:// URL.
func OpenURL(u string, readOnly bool) (*Dev, error) {
	s, err := ParseURL(u)
	if err != nil {
		return nil, err
	}
	s.ReadOnly = readOnly
	return Open(s)
}

// Open logs in to the LUN and reads its capacity. The first session must
// come up (through any portal); the others connect in the background.
func Open(s Spec) (*Dev, error) {
	if len(s.Portals) == 0 {
		return nil, fmt.Errorf("%w: iscsi spec without portals", ErrBadSpec)
	}
	if s.Initiator == "" {
		s.Initiator = DefaultInitiator()
	}
	if s.Timeout <= 0 {
		s.Timeout = 15 * time.Second
	}
	if s.RetryTimeout <= 0 {
		s.RetryTimeout = 60 * time.Second
	}
	if s.Sessions <= 0 {
		s.Sessions = 1
	}
	d := &Dev{spec: s, blockSize: 512, upCh: make(chan struct{})}
	for i := 0; i < s.Sessions; i++ {
		c, err := newConn(d, i)
		if err != nil {
			d.closeConns()
			return nil, err
		}
		d.conns = append(d.conns, c)
	}
	first := d.conns[0]
	first.portal = len(s.Portals) - 1 // so dialAny starts at portal 0
	if err := first.dialAny(0); err != nil {
		d.closeConns()
		return nil, fmt.Errorf("open %s: %w", s, err)
	}
	if err := d.readCapacity(first); err != nil {
		first.destroy(first.vc)
		first.vc = nil
		d.closeConns()
		return nil, fmt.Errorf("open %s: %w", s, err)
	}
	first.up.Store(true)
	for i, c := range d.conns {
		if i > 0 {
			// Spread the sessions over the portals' order from the one that
			// worked; each starts at first.portal.
			c.portal = (first.portal + len(s.Portals) - 1) % len(s.Portals)
		}
		c.started.Store(true)
		go c.loop()
	}
	return d, nil
}

// readCapacity asks READ CAPACITY(16), falling back to (10) for targets
// without it, on a session not yet handed to its loop.
func (d *Dev) readCapacity(c *conn) error {
	deadline := time.Now().Add(d.spec.Timeout)
	var r *request
	for try := 0; ; try++ {
		r = newRequest(C.VT_RC16, 0, 0, nil)
		err := c.runSync(c.vc, r, deadline)
		if err != nil && !r.transport && !r.retry {
			r = newRequest(C.VT_RC10, 0, 0, nil)
			err = c.runSync(c.vc, r, deadline)
		}
		if err == nil {
			break
		}
		if r.retry && try < 5 {
			continue
		}
		return fmt.Errorf("read capacity: %w", err)
	}
	if r.rcBlock == 0 || r.rcBlock%512 != 0 || r.rcBlock > 1<<20 {
		return fmt.Errorf("%w: target reports block size %d", ErrSCSI, r.rcBlock)
	}
	d.blockSize = int64(r.rcBlock)
	d.size.Store(int64(r.rcLBA+1) * d.blockSize)
	d.lbpme = r.rcLBPME
	return nil
}

// Refresh re-reads the LUN size (after the volume was extended).
func (d *Dev) Refresh() error {
	r := newRequest(C.VT_RC16, 0, 0, nil)
	if err := d.do(r); err != nil {
		r = newRequest(C.VT_RC10, 0, 0, nil)
		if err := d.do(r); err != nil {
			return err
		}
	}
	d.size.Store(int64(r.rcLBA+1) * int64(r.rcBlock))
	return nil
}

// Spec is the spec the device was opened with (print it: no password).
func (d *Dev) Spec() Spec { return d.spec }

// BlockSize is the LUN's logical block size.
func (d *Dev) BlockSize() int64 { return d.blockSize }

func (d *Dev) notifyUp() {
	d.upMu.Lock()
	close(d.upCh)
	d.upCh = make(chan struct{})
	d.upMu.Unlock()
}

// pick returns the least loaded live session, waiting until the deadline
// for one to come up.
func (d *Dev) pick(deadline time.Time) (*conn, error) {
	for {
		if d.closed.Load() {
			return nil, ErrClosed
		}
		if best := d.pickUp(); best != nil {
			return best, nil
		}
		d.upMu.Lock()
		ch := d.upCh
		d.upMu.Unlock()
		wait := time.Until(deadline)
		if wait <= 0 {
			var errs []error
			for _, c := range d.conns {
				if e := c.err(); e != nil {
					errs = append(errs, e)
					break // all sessions try the same portals: one says it
				}
			}
			return nil, fmt.Errorf("no iSCSI session to %s for %v: %w", d.spec, d.spec.RetryTimeout, errors.Join(errs...))
		}
		select {
		case <-ch:
		case <-time.After(min(wait, 100*time.Millisecond)):
		}
	}
}

// do runs r, retrying it on another session when its session fails and
// when the target asks for a retry, for up to RetryTimeout.
func (d *Dev) do(r *request) error {
	deadline := time.Now().Add(d.spec.RetryTimeout)
	for {
		c, err := d.pick(deadline)
		if err != nil {
			return err
		}
		r.err, r.transport, r.retry = nil, false, false
		r.done, r.cb = make(chan struct{}), nil
		c.enqueue(r)
		<-r.done
		if r.err == nil || !(r.transport || r.retry) || d.closed.Load() {
			return r.err
		}
		if time.Now().After(deadline) {
			return r.err
		}
		if r.retry && !r.transport {
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// rw runs a block-aligned transfer, split into pieces of at most maxXfer
// that run in parallel.
func (d *Dev) rw(op C.int, p []byte, off int64) error {
	if len(p) <= maxXfer {
		return d.do(newRequest(op, uint64(off/d.blockSize), uint32(int64(len(p))/d.blockSize), p))
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for pos := 0; pos < len(p); pos += maxXfer {
		end := min(pos+maxXfer, len(p))
		wg.Add(1)
		go func(pos, end int) {
			defer wg.Done()
			err := d.do(newRequest(op, uint64((off+int64(pos))/d.blockSize), uint32(int64(end-pos)/d.blockSize), p[pos:end]))
			if err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}(pos, end)
	}
	wg.Wait()
	return first
}

// ReadAtAsync starts a read and calls done when it ends, on a session's
// goroutine. The command is queued, not sent: Unplug sends every command
// queued since the last one together. Reads that need splitting, padding
// or a retry run the synchronous path on a goroutine of their own.
func (d *Dev) ReadAtAsync(p []byte, off int64, done func(error)) {
	var c *conn
	if !d.closed.Load() && len(p) > 0 && len(p) <= maxXfer && d.aligned(off, len(p)) &&
		blockdev.CheckRange(d.Size(), off, int64(len(p))) == nil {
		c = d.pickUp()
	}
	if c == nil {
		go func() {
			_, err := d.ReadAt(p, off)
			done(err)
		}()
		return
	}
	r := &request{op: C.VT_READ16, lba: uint64(off / d.blockSize), nblocks: uint32(int64(len(p)) / d.blockSize), buf: p}
	r.cb = func() {
		if r.err != nil && (r.transport || r.retry) && !d.closed.Load() {
			go func() {
				if err := d.do(r); err != nil {
					done(fmt.Errorf("iscsi read %d bytes at %d: %w", len(p), off, err))
					return
				}
				done(nil)
			}()
			return
		}
		if r.err != nil {
			done(fmt.Errorf("iscsi read %d bytes at %d: %w", len(p), off, r.err))
			return
		}
		done(nil)
	}
	c.enqueueHeld(r)
}

// Unplug sends the commands ReadAtAsync queued.
func (d *Dev) Unplug() {
	for _, c := range d.conns {
		c.release()
	}
}

// pickUp is the least loaded live session, or nil.
func (d *Dev) pickUp() *conn {
	var best *conn
	for _, c := range d.conns {
		if c.up.Load() && (best == nil || c.load.Load() < best.load.Load()) {
			best = c
		}
	}
	return best
}

func (d *Dev) aligned(off int64, n int) bool {
	return off%d.blockSize == 0 && int64(n)%d.blockSize == 0
}

// ReadAt reads with READ(16). Unaligned reads read the covering blocks.
func (d *Dev) ReadAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	if err := blockdev.CheckRange(d.Size(), off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if d.aligned(off, len(p)) {
		if err := d.rw(C.VT_READ16, p, off); err != nil {
			return 0, fmt.Errorf("iscsi read %d bytes at %d: %w", len(p), off, err)
		}
		return len(p), nil
	}
	start := off / d.blockSize * d.blockSize
	end := (off + int64(len(p)) + d.blockSize - 1) / d.blockSize * d.blockSize
	tmp := make([]byte, end-start)
	if err := d.rw(C.VT_READ16, tmp, start); err != nil {
		return 0, fmt.Errorf("iscsi read %d bytes at %d: %w", len(p), off, err)
	}
	copy(p, tmp[off-start:])
	return len(p), nil
}

// WriteAt writes with WRITE(16). Unaligned writes read-modify-write the
// partial blocks at the edges.
func (d *Dev) WriteAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	if d.spec.ReadOnly {
		return 0, blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if d.aligned(off, len(p)) {
		if err := d.rw(C.VT_WRITE16, p, off); err != nil {
			return 0, fmt.Errorf("iscsi write %d bytes at %d: %w", len(p), off, err)
		}
		return len(p), nil
	}
	d.rmwMu.Lock()
	defer d.rmwMu.Unlock()
	start := off / d.blockSize * d.blockSize
	end := (off + int64(len(p)) + d.blockSize - 1) / d.blockSize * d.blockSize
	tmp := make([]byte, end-start)
	// Only the first and last blocks need their old contents.
	if err := d.rw(C.VT_READ16, tmp[:d.blockSize], start); err != nil {
		return 0, fmt.Errorf("iscsi write at %d: read-modify-write: %w", off, err)
	}
	if end-start > d.blockSize {
		last := end - start - d.blockSize
		if err := d.rw(C.VT_READ16, tmp[last:], end-d.blockSize); err != nil {
			return 0, fmt.Errorf("iscsi write at %d: read-modify-write: %w", off, err)
		}
	}
	copy(tmp[off-start:], p)
	if err := d.rw(C.VT_WRITE16, tmp, start); err != nil {
		return 0, fmt.Errorf("iscsi write %d bytes at %d: %w", len(p), off, err)
	}
	return len(p), nil
}

func (d *Dev) Size() int64 { return d.size.Load() }

// Flush sends SYNCHRONIZE CACHE(16) on every live session: each may hold
// acknowledged writes in the target's cache.
func (d *Dev) Flush() error {
	if d.closed.Load() {
		return ErrClosed
	}
	if d.spec.ReadOnly {
		return nil
	}
	// tgtd (and most targets) flush the whole LU whichever I_T nexus asks,
	// but the SCSI model is per LU, so one command suffices.
	if err := d.do(newRequest(C.VT_SYNC16, 0, 0, nil)); err != nil {
		return fmt.Errorf("iscsi flush: %w", err)
	}
	return nil
}

// Trim sends UNMAP for the whole blocks inside the range, when the LUN is
// thin provisioned (READ CAPACITY(16) LBPME); otherwise ErrUnsupported.
func (d *Dev) Trim(off, length int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if d.spec.ReadOnly {
		return blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	if !d.lbpme {
		return fmt.Errorf("%w: LUN is not thin provisioned (no UNMAP)", blockdev.ErrUnsupported)
	}
	first := (off + d.blockSize - 1) / d.blockSize
	last := (off + length) / d.blockSize
	const maxBlocks = 1 << 22 // keep one UNMAP descriptor modest
	for lba := first; lba < last; lba += maxBlocks {
		n := min(last-lba, maxBlocks)
		if err := d.do(newRequest(C.VT_UNMAP, uint64(lba), uint32(n), nil)); err != nil {
			return fmt.Errorf("iscsi trim: %w", err)
		}
	}
	return nil
}

// WriteZeroes writes zero blocks (tgtd's WRITE SAME is not dependable).
func (d *Dev) WriteZeroes(off, length int64) error {
	if d.spec.ReadOnly {
		return blockdev.ErrReadOnly
	}
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return err
	}
	return blockdev.ZeroFill(d, off, length)
}

func (d *Dev) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.Size(), off, length); err != nil {
		return nil, err
	}
	return []blockdev.Extent{{Length: length}}, nil
}

func (d *Dev) Prefetch(off, length int64) error { return nil }

func (d *Dev) Caps() blockdev.Caps {
	return blockdev.Caps{
		ReadOnly:       d.spec.ReadOnly,
		Flush:          true,
		Trim:           d.lbpme && !d.spec.ReadOnly,
		WriteZeroes:    !d.spec.ReadOnly,
		MultiConn:      true,
		MinBlock:       uint32(min(d.blockSize, 512)),
		PreferredBlock: uint32(max(d.blockSize, 4096)),
		MaxBlock:       32 << 20,
	}
}

// Close logs out every session. I/O still running fails with ErrClosed.
func (d *Dev) Close() error {
	d.once.Do(func() {
		d.closed.Store(true)
		d.closeConns()
	})
	return nil
}

func (d *Dev) closeConns() {
	for _, c := range d.conns {
		select {
		case <-c.quit:
		default:
			close(c.quit)
		}
	}
	for _, c := range d.conns {
		if !c.started.Load() && c.vc != nil {
			c.destroy(c.vc)
			c.vc = nil
		}
		if c.started.Load() {
			var one = [8]byte{1}
			writeWake(c.wakefd, one[:])
			<-c.gone
		} else {
			closeFD(c.wakefd)
		}
	}
}

// senseError names a CHECK CONDITION.
func senseError(op C.int, key, ascq int) error {
	switch {
	case key == C.SCSI_SENSE_ILLEGAL_REQUEST && ascq == 0x2500:
		return fmt.Errorf("%w (sense: logical unit not supported)", ErrNoLUN)
	case key == C.SCSI_SENSE_ILLEGAL_REQUEST && ascq == 0x2100:
		return fmt.Errorf("%w: target says LBA out of range", blockdev.ErrOutOfRange)
	case key == C.SCSI_SENSE_ILLEGAL_REQUEST && (op == C.VT_UNMAP || ascq == 0x2000):
		return fmt.Errorf("%w: target rejected the command (sense 0x%x/0x%04x)", blockdev.ErrUnsupported, key, ascq)
	case key == C.SCSI_SENSE_DATA_PROTECTION:
		return fmt.Errorf("%w: target says write protected (sense 0x%x/0x%04x)", blockdev.ErrReadOnly, key, ascq)
	}
	return fmt.Errorf("%w: sense key 0x%x (%s) ASC/ASCQ 0x%04x", ErrSCSI, key, C.GoString(C.scsi_sense_key_str(C.int(key))), ascq)
}
