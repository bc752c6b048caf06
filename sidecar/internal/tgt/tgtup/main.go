// Command tgtup starts a private tgtd target (package tgt) for demos,
// Python tests and benchmarks, prints it as shell variables and JSON, and
// stops it on SIGINT/SIGTERM or when stdin closes (with -stdin).
//
//	go run ./sidecar/internal/tgt/tgtup -size 1G -portals 2 > tgt.env &
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmthunder/vmthunder/sidecar/internal/tgt"
)

func main() {
	var o tgt.Options
	size := flag.String("size", "64M", "size of a new backing file (K, M, G suffixes)")
	flag.StringVar(&o.BackingFile, "file", "", "serve this existing file instead of a new one")
	flag.StringVar(&o.Dir, "dir", "", "directory for the backing file and logs (default: a temp dir)")
	flag.BoolVar(&o.Zero, "zero", false, "leave a new backing file zeroed instead of random")
	flag.StringVar(&o.IQN, "iqn", "", "target IQN (default: random)")
	flag.IntVar(&o.Portals, "portals", 1, "number of portals (one tgtd each)")
	flag.StringVar(&o.CHAPUser, "chap-user", "", "CHAP user")
	flag.StringVar(&o.CHAPPassword, "chap-password", "", "CHAP password")
	flag.BoolVar(&o.Thin, "thin", false, "thin provisioned LUN (UNMAP)")
	stdin := flag.Bool("stdin", false, "also stop when stdin reaches EOF")
	flag.Parse()
	n, err := parseSize(*size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tgtup:", err)
		os.Exit(2)
	}
	o.Size = n
	tg, err := tgt.StartE(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tgtup:", err)
		os.Exit(1)
	}
	defer tg.Stop()
	ci, _ := json.Marshal(tg.ConnectionInfo())
	fmt.Printf("TGT_URL='%s'\nTGT_PORTALS='%s'\nTGT_IQN='%s'\nTGT_LUN=%d\nTGT_FILE='%s'\nTGT_CONNECTION_INFO='%s'\n",
		tg.URL(0), strings.Join(tg.Portals, " "), tg.IQN, tg.LUN, tg.BackingFile, ci)
	fmt.Println("TGT_READY=1")
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	eof := make(chan struct{})
	if *stdin {
		go func() { io.Copy(io.Discard, bufio.NewReader(os.Stdin)); close(eof) }()
	}
	select {
	case <-sig:
	case <-eof:
	}
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}
