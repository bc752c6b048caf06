// Package publish makes template volumes in Cinder (`vmthunder publish`):
// a volume of the template type holding an image, read back for its
// sha256 generation, tagged with the vmthunder_* metadata and made
// read-only (docs/api.md, "Templates"). It reads and writes the LUN with
// the iSCSI origin through this node's own attachments.
package publish

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

// Timeout bounds each wait for Cinder (a volume made from an image is
// copied by cinder-volume first).
var Timeout = 30 * time.Minute

// Options say where and how to publish.
type Options struct {
	Client     *openstack.Client
	VolumeType string // [cinder] template_volume_type (multiattach)
	Initiator  string // this node's IQN, as its attachments' connector gives it
	ChunkSize  int64  // recorded as vmthunder_chunk_size
	// Keep leaves a half-published volume in place (for a look at it).
	Keep bool
	// Progress, when set, is told each copy's phase ("write", "verify"),
	// bytes done and total: done 0 first, done == total last.
	Progress func(phase string, done, total int64)
	// Say, when set, is told what is happening, one line at a time.
	Say func(format string, a ...any)
}

// File publishes a raw image file as template name.
func File(ctx context.Context, o Options, path, name, imageID string) (api.Template, error) {
	p := o.publisher()
	return p.fromFile(ctx, path, name, imageID)
}

// Image publishes Glance image (id, or a name Cinder resolves) as
// template name in a volume of gib GiB (0: 1).
func Image(ctx context.Context, o Options, image, name string, gib int) (api.Template, error) {
	p := o.publisher()
	return p.fromImage(ctx, image, name, gib)
}

func (o Options) publisher() *publisher {
	p := &publisher{c: o.Client, volumeType: o.VolumeType, initiator: o.Initiator, chunkSize: o.ChunkSize, keep: o.Keep,
		progress: o.Progress, say: o.Say}
	if p.progress == nil {
		p.progress = func(string, int64, int64) {}
	}
	if p.say == nil {
		p.say = func(string, ...any) {}
	}
	return p
}

type publisher struct {
	c          *openstack.Client
	volumeType string
	initiator  string
	chunkSize  int64
	keep       bool
	progress   func(phase string, done, total int64)
	say        func(format string, a ...any)
}

// fromFile creates a volume of the file's size (GiB rounded up), writes
// the file into it through an rw attachment, reads it back for the
// generation, then tags it and makes it read-only.
func (p *publisher) fromFile(ctx context.Context, path, name, imageID string) (api.Template, error) {
	f, err := os.Open(path)
	if err != nil {
		return api.Template{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return api.Template{}, err
	}
	size := st.Size()
	if !st.Mode().IsRegular() || size == 0 {
		return api.Template{}, fmt.Errorf("%s is not a non-empty regular file", path)
	}
	gib := int((size + 1<<30 - 1) >> 30)
	v, err := p.c.CreateVolume(ctx, openstack.CreateOpts{Name: name, SizeGiB: gib, VolumeType: p.volumeType,
		Metadata: map[string]string{"vmthunder_publishing": "1"}})
	if err != nil {
		return api.Template{}, err
	}
	p.say("volume %s (%d GiB, type %s) created; waiting for it", v.ID, gib, p.volumeType)
	var t api.Template
	err = func() error {
		if _, err := p.c.WaitStatus(ctx, v.ID, Timeout, nil, "available"); err != nil {
			return err
		}
		sum, checksum, err := p.write(ctx, v.ID, f, size)
		if err != nil {
			return err
		}
		t, err = p.finish(ctx, v.ID, size, sum, imageID, checksum)
		return err
	}()
	if err != nil {
		return api.Template{}, p.failed(v.ID, err)
	}
	return t, nil
}

// fromImage has Cinder create the volume from a Glance image, then reads
// it back for the generation (its content is the whole volume).
func (p *publisher) fromImage(ctx context.Context, image, name string, gib int) (api.Template, error) {
	if gib == 0 {
		gib = 1
	}
	v, err := p.c.CreateVolume(ctx, openstack.CreateOpts{Name: name, SizeGiB: gib, VolumeType: p.volumeType,
		ImageID: image, Metadata: map[string]string{"vmthunder_publishing": "1"}})
	if err != nil {
		return api.Template{}, err
	}
	p.say("volume %s (%d GiB) is being created from image %s by cinder-volume", v.ID, gib, image)
	var t api.Template
	err = func() error {
		last := ""
		v, err := p.c.WaitStatus(ctx, v.ID, Timeout, func(s string) {
			if s != last {
				p.say("volume %s: %s", v.ID, s)
				last = s
			}
		}, "available")
		if err != nil {
			return err
		}
		// The content is the whole LUN, as every export of it shows it.
		sum, size, err := p.readBack(ctx, v.ID, -1)
		if err != nil {
			return err
		}
		// --image may name the image; Cinder records its id.
		id := image
		if got := v.VolumeImageMetadata["image_id"]; got != "" {
			id = got
		}
		t, err = p.finish(ctx, v.ID, size, sum, id, v.VolumeImageMetadata["checksum"])
		return err
	}()
	if err != nil {
		return api.Template{}, p.failed(v.ID, err)
	}
	return t, nil
}

// failed deletes a half-published volume (unless asked to keep it).
func (p *publisher) failed(id string, err error) error {
	if p.keep {
		return fmt.Errorf("%w (volume %s kept: --keep-on-error)", err, id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, werr := p.c.WaitStatus(ctx, id, time.Minute, nil, "available", "error"); werr == nil || openstack.IsNotFound(werr) {
		if derr := p.c.DeleteVolume(ctx, id); derr != nil {
			return fmt.Errorf("%w (and deleting volume %s: %v)", err, id, derr)
		}
		return fmt.Errorf("%w (volume %s deleted)", err, id)
	}
	return fmt.Errorf("%w (volume %s left: delete it by hand)", err, id)
}

// attached opens volume id's LUN through an attachment of this node in
// mode, and returns the device and a function that closes it and deletes
// the attachment.
func (p *publisher) attached(ctx context.Context, id, mode string) (*iscsi.Dev, func() error, error) {
	a, err := p.c.Attach(ctx, id, mode)
	if err != nil {
		return nil, nil, err
	}
	is, err := origin.ParseConnectionInfo(a.ConnectionInfo)
	if err == nil {
		is.ReadOnly = mode == openstack.ModeRO
		is.Initiator = p.initiator
		var dev *iscsi.Dev
		if dev, err = iscsi.Open(is); err == nil {
			return dev, func() error {
				cerr := dev.Close()
				return errors.Join(cerr, p.c.Detach(context.WithoutCancel(ctx), a.ID))
			}, nil
		}
	}
	return nil, nil, errors.Join(err, p.c.Detach(context.WithoutCancel(ctx), a.ID))
}

// ioBlock is the unit of the copy; the last block of a file is padded
// with zeroes (the LUN's block size divides it).
const ioBlock = 1 << 20

// write copies size bytes of r into volume id, then reads them back: the
// generation is the sha256 of what the volume holds. It also returns the
// md5 of the file (what Glance calls an image's checksum).
func (p *publisher) write(ctx context.Context, id string, r io.Reader, size int64) (string, string, error) {
	dev, done, err := p.attached(ctx, id, openstack.ModeRW)
	if err != nil {
		return "", "", err
	}
	if dev.Size() < size {
		done()
		return "", "", fmt.Errorf("volume %s has %d bytes, the file %d", id, dev.Size(), size)
	}
	wsum, md := sha256.New(), md5.New()
	p.progress("write", 0, size)
	buf := make([]byte, ioBlock)
	var off int64
	for off < size {
		if err := ctx.Err(); err != nil {
			done()
			return "", "", err
		}
		n := int(min(int64(len(buf)), size-off))
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			done()
			return "", "", fmt.Errorf("reading the file at %d: %w", off, err)
		}
		wsum.Write(buf[:n])
		md.Write(buf[:n])
		w := (n + 4095) &^ 4095 // whole blocks; the pad is zeroes
		clear(buf[n:w])
		if _, err := dev.WriteAt(buf[:w], off); err != nil {
			done()
			return "", "", fmt.Errorf("writing volume %s at %d: %w", id, off, err)
		}
		off += int64(n)
		p.progress("write", off, size)
	}
	err = dev.Flush()
	if err == nil {
		err = done()
	} else {
		done()
	}
	if err != nil {
		return "", "", fmt.Errorf("volume %s: %w", id, err)
	}
	rsum, _, err := p.readBack(ctx, id, size)
	if err != nil {
		return "", "", err
	}
	if want := "sha256:" + hex.EncodeToString(wsum.Sum(nil)); rsum != want {
		return "", "", fmt.Errorf("volume %s reads back %s, the file is %s: the write did not land", id, rsum, want)
	}
	return rsum, hex.EncodeToString(md.Sum(nil)), nil
}

// readBack is the sha256 generation of volume id's first size bytes (-1:
// the whole LUN), read through a read-only attachment, and that size.
func (p *publisher) readBack(ctx context.Context, id string, size int64) (string, int64, error) {
	dev, done, err := p.attached(ctx, id, openstack.ModeRO)
	if err != nil {
		return "", 0, err
	}
	if size < 0 {
		size = dev.Size()
	}
	sum, err := p.hashDevice(ctx, dev, size, sha256.New())
	if derr := done(); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		return "", 0, fmt.Errorf("reading volume %s back: %w", id, err)
	}
	return sum, size, nil
}

func (p *publisher) hashDevice(ctx context.Context, dev *iscsi.Dev, size int64, h hash.Hash) (string, error) {
	if dev.Size() < size {
		return "", fmt.Errorf("the LUN has %d bytes, want %d", dev.Size(), size)
	}
	p.progress("verify", 0, size)
	buf := make([]byte, ioBlock)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := int(min(int64(len(buf)), size-off))
		r := (n + 4095) &^ 4095
		if int64(r) > dev.Size()-off {
			r = int(dev.Size() - off)
		}
		if _, err := dev.ReadAt(buf[:r], off); err != nil {
			return "", fmt.Errorf("at %d: %w", off, err)
		}
		h.Write(buf[:n])
		off += int64(n)
		p.progress("verify", off, size)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// finish tags volume id as a template and makes it read-only.
func (p *publisher) finish(ctx context.Context, id string, size int64, generation, imageID, checksum string) (api.Template, error) {
	meta := map[string]string{
		openstack.MetaTemplate:      "1",
		openstack.MetaGeneration:    generation,
		openstack.MetaImageID:       imageID,
		openstack.MetaImageChecksum: checksum,
		openstack.MetaChunkSize:     strconv.FormatInt(p.chunkSize, 10),
		openstack.MetaSize:          strconv.FormatInt(size, 10),
		"vmthunder_publishing":      "0",
	}
	if err := p.c.SetMetadata(ctx, id, meta); err != nil {
		return api.Template{}, err
	}
	if err := p.c.SetReadOnly(ctx, id, true); err != nil {
		return api.Template{}, err
	}
	if _, err := p.c.WaitStatus(ctx, id, Timeout, nil, "available", "in-use"); err != nil {
		return api.Template{}, err
	}
	t, _, err := p.c.Template(ctx, id)
	return t, err
}
