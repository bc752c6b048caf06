package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/sys/unix"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/openstack"
	"github.com/vmthunder/vmthunder/sidecar/publish"
)

func init() {
	register("publish", "publish an image as a read-only template volume in Cinder (--file PATH or --image ID)", runPublish)
	register("unpublish", "delete a template volume and its manifest volume from Cinder (refused while attached)", runUnpublish)
}

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
	var bar *progress
	o := publish.Options{Client: c, VolumeType: cfg.Cinder.TemplateVolumeType, Initiator: cfg.Cinder.Initiator,
		ChunkSize: chunkSize, Keep: *keep, Say: say,
		Progress: func(phase string, done, total int64) {
			if done == 0 {
				bar = newProgress(phase, total)
			}
			bar.set(done)
			if done == total {
				bar.finish()
			}
		}}
	var t api.Template
	if *file != "" {
		t, err = publish.File(ctx, o, *file, *name, *imageID)
	} else {
		if *name == "" {
			*name = "vmthunder-template-" + *image
		}
		t, err = publish.Image(ctx, o, *image, *name, *sizeGiB)
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

func runUnpublish(args []string) error {
	fs := flag.NewFlagSet("unpublish", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "ini config file with a [cinder] section (default "+defaultConfig+")")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: vmthunder unpublish [--config FILE] TEMPLATE_VOLUME_ID")
	}
	id := fs.Arg(0)
	if err := api.ValidVolumeID(id); err != nil {
		return err
	}
	cfg, err := loadCinder(*cfgPath)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := openstack.New(ctx, cfg.Cinder)
	if err != nil {
		return err
	}
	deleted, err := publish.Unpublish(ctx, c, id)
	for _, v := range deleted {
		say("deleted volume %s", v)
	}
	return err
}
