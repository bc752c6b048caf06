// Command imagebuild builds the test guest (package guestimage) into a
// directory and prints what it built as one JSON line, for the Python
// harnesses (the Nova functional test, `make demo --openstack`).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/vmthunder/vmthunder/tests/guestimage"
)

func main() {
	dir := flag.String("dir", "", "output directory")
	seed := flag.Uint64("seed", 0, "content seed (0: the default image)")
	flag.Parse()
	img, err := guestimage.Build(guestimage.Options{Dir: *dir, Seed: *seed})
	if err != nil {
		fmt.Fprintln(os.Stderr, "imagebuild:", err)
		os.Exit(1)
	}
	out := map[string]any{
		"root":            img.Root,
		"kernel":          img.Kernel,
		"initrd":          img.Initrd,
		"size":            img.Size,
		"sha256":          img.SHA256,
		"boot_read_bytes": img.BootReadBytes,
		"data_bytes":      img.DataBytes,
		"write_offset":    img.WriteOffset,
		"marker":          guestimage.Marker,
		"write_marker":    guestimage.WriteMarker,
		"cmdline":         img.Cmdline("NONCE"),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
