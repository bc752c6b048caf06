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
	"github.com/vmthunder/vmthunder/sidecar/daemon/precopy"
)

func init() {
	register("copy", "pre-copy an origin (path or iscsi:// URL) whole into a local file, with progress", runCopy)
}

func runCopy(args []string) error {
	fs := flag.NewFlagSet("copy", flag.ContinueOnError)
	quiet := fs.Bool("q", false, "no progress bar")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: vmthunder copy [-q] SRC DST\n\nSRC is a path or iscsi://[user[%%password]@]host[:port]/iqn/lun; DST a file or block device.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return errors.New("need SRC and DST")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var bar *progressbar.ProgressBar
	opts := precopy.Options{}
	if !*quiet {
		opts.Progress = func(done, total int64) {
			if bar == nil {
				bar = progressbar.DefaultBytes(total, "copy")
			}
			bar.Set64(done)
		}
	}
	n, err := precopy.Copy(ctx, fs.Arg(0), fs.Arg(1), opts)
	if bar != nil {
		bar.Finish()
		fmt.Fprintln(os.Stderr)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "copied %d bytes to %s\n", n, fs.Arg(1))
	return nil
}
