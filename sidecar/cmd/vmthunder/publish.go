package main

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/sys/unix"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

func init() {
	register("publish", "publish an image as a read-only template volume in Cinder (--file PATH or --image ID)", runPublish)
}

// publishTimeout bounds each wait for Cinder (a volume made from an image
// is copied by cinder-volume first).
var publishTimeout = 30 * time.Minute

// loadCinder reads the [cinder] section of the config file.
func loadCinder(path string) (*config.Config, error) {
	file := path
	if file == "" {
		file = defaultConfig
	}
	c, warnings, err := config.Load(file)
	if err != nil {
		return nil, err
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "warning:", w)
	}
	if c.Cinder == nil {
		return nil, fmt.Errorf("%s has no [cinder] section (see contrib/vmthunder.conf)", file)
	}
	return c, nil
}

// progress reports a long copy: a bar on a terminal, plain lines (every
// tenth) otherwise.
type progress struct {
	bar   *progressbar.ProgressBar
	what  string
	total int64
	next  int64
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func newProgress(what string, total int64) *progress {
	p := &progress{what: what, total: total}
	if isTerminal(os.Stderr) {
		p.bar = progressbar.DefaultBytes(total, what)
	} else {
		fmt.Fprintf(os.Stderr, "%s: 0/%d bytes\n", what, total)
		p.next = total / 10
	}
	return p
}

func (p *progress) set(done int64) {
	if p.bar != nil {
		p.bar.Set64(done)
		return
	}
	if done >= p.next && done < p.total {
		fmt.Fprintf(os.Stderr, "%s: %d/%d bytes (%d%%)\n", p.what, done, p.total, done*100/max(p.total, 1))
		p.next = done + max(p.total/10, 1)
	}
}

func (p *progress) finish() {
	if p.bar != nil {
		p.bar.Finish() // ends its line itself
		return
	}
	fmt.Fprintf(os.Stderr, "%s: %d/%d bytes (100%%)\n", p.what, p.total, p.total)
}

func say(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

func runPublish(args []string) error {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "ini config file with a [cinder] section (default "+defaultConfig+")")
	file := fs.String("file", "", "publish this raw image file: a new volume is created and the file written into it")
	image := fs.String("image", "", "publish this Glance image (id, or a name Cinder resolves): Cinder creates the volume from it")
	name := fs.String("name", "", "the template volume's name (required with --file; default vmthunder-template-IMAGE)")
	imageID := fs.String("image-id", "", "with --file: the Glance/Nova image the file is (recorded in the metadata)")
	chunk := fs.String("chunk-size", "", "cache chunk size recorded for the template (default the config's [cache] chunk_size)")
	sizeGiB := fs.Int("size-gib", 0, "with --image: the volume's size in GiB (default 1; Cinder refuses one smaller than the image)")
	asJSON := fs.Bool("json", false, "print the template as JSON")
	keep := fs.Bool("keep-on-error", false, "keep the volume when publishing fails (for a look at it)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() != 0:
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	case (*file == "") == (*image == ""):
		return errors.New("give --file PATH --name N or --image IMAGE_ID")
	case *file != "" && *name == "":
		return errors.New("--file needs --name")
	case *image != "" && *imageID != "":
		return errors.New("--image-id is for --file (with --image the image is known)")
	case *file != "" && *sizeGiB != 0:
		return errors.New("--size-gib is for --image (with --file the size is the file's)")
	}
	for _, id := range []string{*image, *imageID} {
		if err := openstack.ValidImageID(id); err != nil {
			return err
		}
	}
	cfg, err := loadCinder(*cfgPath)
	if err != nil {
		return err
	}
	if cfg.Cinder.TemplateVolumeType == "" {
		return fmt.Errorf("%s: [cinder] template_volume_type is not set (a multiattach volume type)", cfg.File)
	}
	chunkSize := cfg.ChunkSize
	if *chunk != "" {
		n, err := config.ParseSize(*chunk)
		if err != nil || n < 4096 || n > 64<<20 || n&(n-1) != 0 {
			return fmt.Errorf("--chunk-size %q is not a power of two between 4K and 64M", *chunk)
		}
		chunkSize = n
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := openstack.New(ctx, cfg.Cinder)
	if err != nil {
		return err
	}
	p := publisher{c: c, cfg: cfg.Cinder, chunkSize: chunkSize, keep: *keep}
	var t api.Template
	if *file != "" {
		t, err = p.fromFile(ctx, *file, *name, *imageID)
	} else {
		if *name == "" {
			*name = "vmthunder-template-" + *image
		}
		t, err = p.fromImage(ctx, *image, *name, *sizeGiB)
	}
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(t)
	}
	say("published template volume %s (%s): generation %s, %d bytes", t.VolumeID, t.Name, t.Generation, t.Size)
	fmt.Println(t.VolumeID)
	return nil
}

type publisher struct {
	c         *openstack.Client
	cfg       *config.Cinder
	chunkSize int64
	keep      bool
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
	v, err := p.c.CreateVolume(ctx, openstack.CreateOpts{Name: name, SizeGiB: gib, VolumeType: p.cfg.TemplateVolumeType,
		Metadata: map[string]string{"vmthunder_publishing": "1"}})
	if err != nil {
		return api.Template{}, err
	}
	say("volume %s (%d GiB, type %s) created; waiting for it", v.ID, gib, p.cfg.TemplateVolumeType)
	var t api.Template
	err = func() error {
		if _, err := p.c.WaitStatus(ctx, v.ID, publishTimeout, nil, "available"); err != nil {
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
	v, err := p.c.CreateVolume(ctx, openstack.CreateOpts{Name: name, SizeGiB: gib, VolumeType: p.cfg.TemplateVolumeType,
		ImageID: image, Metadata: map[string]string{"vmthunder_publishing": "1"}})
	if err != nil {
		return api.Template{}, err
	}
	say("volume %s (%d GiB) is being created from image %s by cinder-volume", v.ID, gib, image)
	var t api.Template
	err = func() error {
		last := ""
		v, err := p.c.WaitStatus(ctx, v.ID, publishTimeout, func(s string) {
			if s != last {
				say("volume %s: %s", v.ID, s)
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
		is.Initiator = p.cfg.Initiator
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
	bar := newProgress("write", size)
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
		bar.set(off)
	}
	bar.finish()
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
	sum, err := hashDevice(ctx, dev, size, sha256.New())
	if derr := done(); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		return "", 0, fmt.Errorf("reading volume %s back: %w", id, err)
	}
	return sum, size, nil
}

func hashDevice(ctx context.Context, dev *iscsi.Dev, size int64, h hash.Hash) (string, error) {
	if dev.Size() < size {
		return "", fmt.Errorf("the LUN has %d bytes, want %d", dev.Size(), size)
	}
	bar := newProgress("verify", size)
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
		bar.set(off)
	}
	bar.finish()
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
	if _, err := p.c.WaitStatus(ctx, id, publishTimeout, nil, "available", "in-use"); err != nil {
		return api.Template{}, err
	}
	t, _, err := p.c.Template(ctx, id)
	return t, err
}
