package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"syscall"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/blockdev"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/internal/unixsock"
	"github.com/vmthunder/vmthunder/sidecar/layer/cache"
	"github.com/vmthunder/vmthunder/sidecar/layer/delay"
	"github.com/vmthunder/vmthunder/sidecar/nbd"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

func init() {
	register("export", "serve one device over NBD in the foreground (like qemu-nbd)", runExport)
}

func runExport(args []string) error {
	fs := flag.NewFlagSet("export", flag.ContinueOnError)
	socket := fs.String("socket", "", "serve on this unix socket")
	listen := fs.String("listen", "", "serve on this TCP HOST:PORT")
	socketGroup := fs.String("socket-group", "", "give the socket to this group, mode 0660 (the group QEMU runs in, e.g. kvm)")
	name := fs.String("name", "", "export name (default \"\")")
	readOnly := fs.Bool("readonly", false, "refuse writes")
	cacheDir := fs.String("cache", "", "copy-on-read base cache directory")
	template := fs.String("base", "", "with --cache: SOURCE is this template's read-only content, whose cache is kept for the next export (default: SOURCE is a volume, whose cache is dropped at exit)")
	generation := fs.String("generation", "", "the template's content version (required with --base)")
	chunk := fs.String("chunk-size", "", fmt.Sprintf("cache chunk size (e.g. 1M; default: the cache's, or %dK)", cache.DefaultChunkSize>>10))
	cowPath := fs.String("cow", "", "copy-on-write store: writes land here, never on SOURCE")
	writeThrough := fs.Bool("write-through", false, "writes go to SOURCE before they are acknowledged")
	delayRead := fs.Duration("delay-read", 0, "test only: sleep this long before each read")
	delayWrite := fs.Duration("delay-write", 0, "test only: sleep this long before each write")
	verbose := fs.Bool("v", false, "debug logging")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: vmthunder export [--socket PATH | --listen HOST:PORT] [flags] SOURCE\n\n"+
			"SOURCE is a file, a block device or iscsi://[user[%%password]@]host[:port]/iqn/lun.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("need exactly one SOURCE")
	}
	if (*socket == "") == (*listen == "") {
		return errors.New("give one of --socket or --listen")
	}
	gid := -1
	if *socketGroup != "" {
		if *socket == "" {
			return errors.New("--socket-group needs --socket")
		}
		g, err := user.LookupGroup(*socketGroup)
		if err != nil {
			return fmt.Errorf("--socket-group: %w", err)
		}
		if gid, err = strconv.Atoi(g.Gid); err != nil {
			return fmt.Errorf("--socket-group %s: gid %q: %w", *socketGroup, g.Gid, err)
		}
	}
	var mode stack.Mode // none given: stack's default (cow with --cow, readonly with --cache, else direct)
	switch {
	case *cowPath != "" && *writeThrough:
		return errors.New("--cow and --write-through exclude each other")
	case *cowPath != "" && *readOnly:
		return errors.New("--cow and --readonly exclude each other")
	case *writeThrough && *readOnly:
		return errors.New("--write-through and --readonly exclude each other")
	case *writeThrough:
		mode = stack.ModeWriteThrough
	case *readOnly:
		mode = stack.ModeReadOnly
	}
	if (*template != "" || *generation != "") && *cacheDir == "" {
		return errors.New("--base names a cached template: give --cache too")
	}
	if *chunk != "" && *cacheDir == "" {
		return errors.New("--chunk-size sizes the cache's chunks: give --cache too")
	}
	var chunkSize int64
	var err error
	if *chunk != "" {
		chunkSize, err = config.ParseSize(*chunk)
	}
	if err != nil {
		return fmt.Errorf("--chunk-size: %w", err)
	}
	log := logrus.New()
	if *verbose {
		log.SetLevel(logrus.DebugLevel)
	}

	dev, err := stack.Build(stack.Options{
		Origin:     origin.Spec{URL: fs.Arg(0)},
		Mode:       mode,
		CacheDir:   *cacheDir,
		ChunkSize:  chunkSize,
		CowPath:    *cowPath,
		Template:   *template,
		Generation: *generation,
	})
	if err != nil {
		return err
	}
	var served blockdev.Device = dev
	if *delayRead > 0 || *delayWrite > 0 {
		served = delay.New(dev, *delayRead, *delayWrite)
	}

	srv := nbd.NewServer(log)
	if err := srv.Add(*name, served); err != nil {
		dev.Close()
		return err
	}
	var l net.Listener
	where := ""
	if *socket != "" {
		l, err = unixsock.Listen(*socket, gid)
		if err != nil {
			err = fmt.Errorf("--socket: %w", err)
		}
		where = "unix:" + *socket
	} else {
		l, err = net.Listen("tcp", *listen)
		if err == nil {
			where = "tcp:" + l.Addr().String()
		}
	}
	if err != nil {
		dev.Close()
		return err
	}
	fmt.Fprintf(os.Stderr, "vmthunder export: serving %q (%d bytes) on %s\n", *name, dev.Size(), where)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	select {
	case s := <-sig:
		log.Infof("export: %v, shutting down (again to exit at once)", s)
		go func() {
			<-sig
			os.Exit(1)
		}()
	case err = <-done:
	}
	l.Close()
	srv.Close()
	if serr := dev.Shutdown(); serr != nil && err == nil {
		err = serr
	}
	if *socket != "" {
		os.Remove(*socket)
	}
	return err
}
