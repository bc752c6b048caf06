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
	"io"
	"os"
	"strconv"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
	"github.com/vmthunder/vmthunder/sidecar/peers"
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
	var mvol string
	err = func() error {
		if _, err := p.c.WaitStatus(ctx, v.ID, Timeout, nil, "available"); err != nil {
			return err
		}
		sum, checksum, man, err := p.write(ctx, v.ID, f, size)
		if err != nil {
			return err
		}
		if mvol, err = p.storeManifest(ctx, v.ID, name, man); err != nil {
			return err
		}
		t, err = p.finish(ctx, v.ID, size, sum, imageID, checksum, man.Root(), mvol)
		return err
	}()
	if err != nil {
		return api.Template{}, p.failed(err, v.ID, mvol)
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
	var mvol string
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
		sum, size, man, err := p.readBack(ctx, v.ID, -1)
		if err != nil {
			return err
		}
		if mvol, err = p.storeManifest(ctx, v.ID, v.Name, man); err != nil {
			return err
		}
		// --image may name the image; Cinder records its id.
		id := image
		if got := v.VolumeImageMetadata["image_id"]; got != "" {
			id = got
		}
		t, err = p.finish(ctx, v.ID, size, sum, id, v.VolumeImageMetadata["checksum"], man.Root(), mvol)
		return err
	}()
	if err != nil {
		return api.Template{}, p.failed(err, v.ID, mvol)
	}
	return t, nil
}

// failed deletes half-published volumes (unless asked to keep them):
// the template and its manifest volume, if made.
func (p *publisher) failed(err error, ids ...string) error {
	for _, id := range ids {
		if id != "" {
			err = p.dropVolume(err, id)
		}
	}
	return err
}

func (p *publisher) dropVolume(err error, id string) error {
	if p.keep {
		return fmt.Errorf("%w (volume %s kept: --keep-on-error)", err, id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, werr := p.c.WaitStatus(ctx, id, time.Minute, nil, "available", "error"); werr == nil || openstack.IsNotFound(werr) {
		if derr := p.c.DeleteVolume(ctx, id); derr != nil && !openstack.IsNotFound(derr) {
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
func (p *publisher) write(ctx context.Context, id string, r io.Reader, size int64) (string, string, *peers.Manifest, error) {
	dev, done, err := p.attached(ctx, id, openstack.ModeRW)
	if err != nil {
		return "", "", nil, err
	}
	if dev.Size() < size {
		done()
		return "", "", nil, fmt.Errorf("volume %s has %d bytes, the file %d", id, dev.Size(), size)
	}
	wsum, md := sha256.New(), md5.New()
	p.progress("write", 0, size)
	buf := make([]byte, ioBlock)
	var off int64
	for off < size {
		if err := ctx.Err(); err != nil {
			done()
			return "", "", nil, err
		}
		n := int(min(int64(len(buf)), size-off))
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			done()
			return "", "", nil, fmt.Errorf("reading the file at %d: %w", off, err)
		}
		wsum.Write(buf[:n])
		md.Write(buf[:n])
		w := (n + 4095) &^ 4095 // whole blocks; the pad is zeroes
		clear(buf[n:w])
		if _, err := dev.WriteAt(buf[:w], off); err != nil {
			done()
			return "", "", nil, fmt.Errorf("writing volume %s at %d: %w", id, off, err)
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
		return "", "", nil, fmt.Errorf("volume %s: %w", id, err)
	}
	rsum, _, man, err := p.readBack(ctx, id, size)
	if err != nil {
		return "", "", nil, err
	}
	if want := "sha256:" + hex.EncodeToString(wsum.Sum(nil)); rsum != want {
		return "", "", nil, fmt.Errorf("volume %s reads back %s, the file is %s: the write did not land", id, rsum, want)
	}
	return rsum, hex.EncodeToString(md.Sum(nil)), man, nil
}

// readBack reads volume id whole through a read-only attachment: the
// sha256 generation of its first size bytes (-1: the whole LUN), that
// size, and the peers manifest of the whole LUN (what a node's base of
// the template holds) in chunks of the template's chunk size.
func (p *publisher) readBack(ctx context.Context, id string, size int64) (string, int64, *peers.Manifest, error) {
	dev, done, err := p.attached(ctx, id, openstack.ModeRO)
	if err != nil {
		return "", 0, nil, err
	}
	if size < 0 {
		size = dev.Size()
	}
	sum, man, err := p.hashDevice(ctx, dev, size)
	if derr := done(); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		return "", 0, nil, fmt.Errorf("reading volume %s back: %w", id, err)
	}
	return sum, size, man, nil
}

// hashDevice reads all of dev once: the generation hashes its first size
// bytes, the manifest every byte.
func (p *publisher) hashDevice(ctx context.Context, dev *iscsi.Dev, size int64) (string, *peers.Manifest, error) {
	total := dev.Size()
	if total < size {
		return "", nil, fmt.Errorf("the LUN has %d bytes, want %d", total, size)
	}
	mw, err := peers.NewManifestWriter(total, p.chunkSize)
	if err != nil {
		return "", nil, err
	}
	h := sha256.New()
	p.progress("verify", 0, total)
	buf := make([]byte, ioBlock)
	for off := int64(0); off < total; {
		if err := ctx.Err(); err != nil {
			return "", nil, err
		}
		n := min(int64(len(buf)), total-off)
		if _, err := dev.ReadAt(buf[:n], off); err != nil {
			return "", nil, fmt.Errorf("at %d: %w", off, err)
		}
		if off < size {
			h.Write(buf[:min(n, size-off)])
		}
		mw.Write(buf[:n])
		off += n
		p.progress("verify", off, total)
	}
	man, err := mw.Manifest()
	if err != nil {
		return "", nil, err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), man, nil
}

// storeManifest keeps the manifest where a node can read it without
// trusting a peer: a small companion volume "<name>.manifest" of the
// template's type, tagged vmthunder_manifest_of, holding the manifest
// file from offset 0 (zero-padded to a block), read back and checked, and
// made read-only. It returns the companion's id.
func (p *publisher) storeManifest(ctx context.Context, template, name string, man *peers.Manifest) (string, error) {
	raw, _ := man.MarshalBinary()
	if name == "" {
		name = template
	}
	gib := int((int64(len(raw)) + 1<<30 - 1) >> 30)
	v, err := p.c.CreateVolume(ctx, openstack.CreateOpts{Name: name + ".manifest", SizeGiB: gib, VolumeType: p.volumeType,
		Metadata: map[string]string{openstack.MetaManifestOf: template, "vmthunder_publishing": "1"}})
	if err != nil {
		return "", err
	}
	p.say("manifest of %d chunks (root %s) goes to volume %s", man.Chunks(), man.Root(), v.ID)
	err = func() error {
		if _, err := p.c.WaitStatus(ctx, v.ID, Timeout, nil, "available"); err != nil {
			return err
		}
		dev, done, err := p.attached(ctx, v.ID, openstack.ModeRW)
		if err != nil {
			return err
		}
		buf := make([]byte, (len(raw)+4095)&^4095)
		copy(buf, raw)
		_, err = dev.WriteAt(buf, 0)
		if err == nil {
			err = dev.Flush()
		}
		if derr := done(); err == nil {
			err = derr
		}
		if err != nil {
			return fmt.Errorf("writing the manifest to volume %s: %w", v.ID, err)
		}
		got, err := ReadManifestVolume(ctx, p.c, v.ID, p.initiator, man.Root())
		if err != nil {
			return err
		}
		if !got.Equal(man) {
			return fmt.Errorf("volume %s does not read back the manifest written", v.ID)
		}
		if err := p.c.SetMetadata(ctx, v.ID, map[string]string{"vmthunder_publishing": "0"}); err != nil {
			return err
		}
		return p.c.SetReadOnly(ctx, v.ID, true)
	}()
	if err != nil {
		return v.ID, err
	}
	return v.ID, nil
}

// ReadManifestVolume reads the manifest file held by volume id (a
// template's companion) through a read-only attachment of this node
// (initiator: its IQN), bounded by peers.MaxManifestBytes, and returns it
// only if its root is wantRoot (from the template's metadata).
func ReadManifestVolume(ctx context.Context, c *openstack.Client, id, initiator, wantRoot string) (*peers.Manifest, error) {
	a, err := c.Attach(ctx, id, openstack.ModeRO)
	if err != nil {
		return nil, err
	}
	raw, err := func() ([]byte, error) {
		is, err := origin.ParseConnectionInfo(a.ConnectionInfo)
		if err != nil {
			return nil, err
		}
		is.ReadOnly, is.Initiator = true, initiator
		dev, err := iscsi.Open(is)
		if err != nil {
			return nil, err
		}
		defer dev.Close()
		head := make([]byte, 4096)
		if dev.Size() < int64(len(head)) {
			return nil, fmt.Errorf("volume %s has %d bytes: no manifest", id, dev.Size())
		}
		if _, err := dev.ReadAt(head, 0); err != nil {
			return nil, err
		}
		n, err := peers.ManifestFileSize(head)
		if err != nil {
			return nil, err
		}
		if n > peers.MaxManifestBytes || n > dev.Size() {
			return nil, fmt.Errorf("volume %s: a manifest of %d bytes does not fit (limit %d, volume %d)", id, n, peers.MaxManifestBytes, dev.Size())
		}
		buf := make([]byte, (n+4095)&^4095)
		if int64(len(buf)) > dev.Size() {
			buf = buf[:dev.Size()]
		}
		if _, err := dev.ReadAt(buf, 0); err != nil {
			return nil, err
		}
		return buf[:n], nil
	}()
	if derr := c.Detach(context.WithoutCancel(ctx), a.ID); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		return nil, fmt.Errorf("manifest volume %s: %w", id, err)
	}
	m, err := peers.ParseManifest(raw)
	if err != nil {
		return nil, fmt.Errorf("manifest volume %s: %w", id, err)
	}
	if m.Root() != wantRoot {
		return nil, fmt.Errorf("manifest volume %s: %w: root %s, the template names %s", id, peers.ErrManifest, m.Root(), wantRoot)
	}
	return m, nil
}

// finish tags volume id as a template and makes it read-only.
func (p *publisher) finish(ctx context.Context, id string, size int64, generation, imageID, checksum, manifestRoot, manifestVolume string) (api.Template, error) {
	meta := map[string]string{
		openstack.MetaManifestRoot:   manifestRoot,
		openstack.MetaManifestVolume: manifestVolume,
		openstack.MetaTemplate:       "1",
		openstack.MetaGeneration:     generation,
		openstack.MetaImageID:        imageID,
		openstack.MetaImageChecksum:  checksum,
		openstack.MetaChunkSize:      strconv.FormatInt(p.chunkSize, 10),
		openstack.MetaSize:           strconv.FormatInt(size, 10),
		"vmthunder_publishing":       "0",
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

// ErrAttached: a volume to unpublish still has attachments (a node has
// the template open, or is reading its manifest).
var ErrAttached = errors.New("volume is attached")

// Unpublish deletes template volume id and its manifest volume (the one
// its metadata names, if that volume names it back), refusing while
// either has an attachment. It returns the ids deleted.
func Unpublish(ctx context.Context, c *openstack.Client, id string) ([]string, error) {
	_, v, err := c.Template(ctx, id)
	if err != nil {
		return nil, err
	}
	ref, _, err := openstack.ParseManifestRef(v)
	if err != nil {
		return nil, err
	}
	vols := []*openstack.Volume{v}
	if ref.Volume != "" {
		mv, err := c.Volume(ctx, ref.Volume)
		switch {
		case openstack.IsNotFound(err):
		case err != nil:
			return nil, err
		case mv.Metadata[openstack.MetaManifestOf] != v.ID:
			return nil, fmt.Errorf("volume %s, named by %s's %s, is not its manifest volume (its %s is %q): not deleting it",
				mv.ID, v.ID, openstack.MetaManifestVolume, openstack.MetaManifestOf, mv.Metadata[openstack.MetaManifestOf])
		default:
			vols = append(vols, mv)
		}
	}
	for _, x := range vols {
		if n := len(x.Attachments); n > 0 || x.Status == "in-use" || x.Status == "attaching" {
			hosts := make([]string, 0, n)
			for _, a := range x.Attachments {
				hosts = append(hosts, a.HostName)
			}
			return nil, fmt.Errorf("volume %s (%s): %w: %d attachments (hosts %v); detach every export of the template first", x.ID, x.Status, ErrAttached, n, hosts)
		}
	}
	var done []string
	for _, x := range vols {
		if err := c.DeleteVolume(ctx, x.ID); err != nil {
			return done, err
		}
		done = append(done, x.ID)
	}
	return done, nil
}
