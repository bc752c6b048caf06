package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/daemon"
)

const defaultConfig = "/etc/vmthunder/vmthunder.conf"

func init() {
	register("daemon", "run the sidecar daemon (API socket, NBD exports, metrics)", runDaemon)
}

func runDaemon(args []string) error {
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	path := fs.String("config", "", "ini config file (default "+defaultConfig+" if it exists)")
	debug := fs.Bool("debug", false, "debug logging (overrides log_level)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return errors.New("daemon takes no arguments")
	}
	log := logrus.New()
	log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	cfg := config.Defaults()
	file := *path
	if file == "" && config.Exists(defaultConfig) {
		file = defaultConfig
	}
	if file != "" {
		c, warnings, err := config.Load(file)
		if err != nil {
			return err
		}
		for _, w := range warnings {
			log.Warn(w)
		}
		cfg = c
	}
	log.SetLevel(cfg.LogLevel)
	if *debug {
		log.SetLevel(logrus.DebugLevel)
	}
	d, err := daemon.New(cfg, log)
	if err != nil {
		return err
	}
	if err := d.Start(); err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	s := <-sig
	log.Infof("%v: shutting down", s)
	if err := d.Close(); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}
