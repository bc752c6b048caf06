// Command bulkreplay replays a boot trace (package tests/bulk) straight
// against an iSCSI LUN with the sidecar's own initiator (libiscsi), from
// whatever network namespace it is started in: the bulk-boot harness runs
// it with `ip netns exec` as the direct-iSCSI baseline of a node. It
// prints the replay's result as JSON.
//
//	bulkreplay -trace T.json.gz -iscsi iscsi://HOST:PORT/IQN/LUN [-verify FILE]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
	"github.com/vmthunder/vmthunder/tests/bulk"
)

func main() {
	tracePath := flag.String("trace", "", "trace file (required)")
	url := flag.String("iscsi", "", "iscsi:// URL of the LUN (required)")
	verify := flag.String("verify", "", "compare every read with this file (the LUN's content)")
	flag.Parse()
	res, err := run(*tracePath, *url, *verify)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bulkreplay: %v\n", err)
		os.Exit(1)
	}
	json.NewEncoder(os.Stdout).Encode(res)
}

func run(tracePath, url, verify string) (*bulk.Result, error) {
	if tracePath == "" || url == "" {
		return nil, fmt.Errorf("-trace and -iscsi are required")
	}
	t, err := bulk.LoadTrace(tracePath)
	if err != nil {
		return nil, err
	}
	var o bulk.ReplayOptions
	if verify != "" {
		f, err := os.Open(verify)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		o.Verify = f
	}
	dev, err := iscsi.OpenURL(url, true)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", url, err)
	}
	defer dev.Close()
	return bulk.Replay(t, dev, o), nil
}
