package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
)

func init() {
	register("trace", "a template base's boot trace: show|export|import|delete|stop BASE", runTrace)
}

const traceUsage = `usage: vmthunder trace show [--json] BASE
       vmthunder trace export BASE [FILE]   (default: standard output)
       vmthunder trace import BASE [FILE]   (default: standard input)
       vmthunder trace delete BASE
       vmthunder trace stop BASE            (end a recording now, keep it)`

func runTrace(args []string) error {
	if len(args) == 0 {
		return errors.New(traceUsage)
	}
	sub := args[0]
	fs := flag.NewFlagSet("trace "+sub, flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "show: print as JSON")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	n := fs.NArg()
	if n < 1 || n > 2 || (n == 2 && sub != "export" && sub != "import") {
		return errors.New(traceUsage)
	}
	base, file := fs.Arg(0), fs.Arg(1)
	c := newClient()
	ctx, cancel := cliCtx()
	defer cancel()
	switch sub {
	case "show":
		t, err := c.Trace(ctx, base)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(t)
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(w, "base\t%s\nstored\t%v\nchunks\t%d of %d bytes (%d bytes)\nrecorded over\t%d ms\nrecording\t%v\nreplaying\t%v\n",
			t.Base, t.Present, t.Chunks, t.ChunkSize, t.Bytes, t.DurationMS, t.Recording, t.Replaying)
		fmt.Fprintf(w, "prefetched\t%d chunks, %d bytes (%d read by guests, %d bytes wasted)\nbacked off\t%v\n",
			t.PrefetchedChunks, t.PrefetchedBytes, t.HitChunks, t.WastedBytes, t.BackedOff)
		return w.Flush()
	case "export":
		raw, err := c.ExportTrace(ctx, base)
		if err != nil {
			return err
		}
		if file == "" || file == "-" {
			_, err = os.Stdout.Write(raw)
			return err
		}
		return os.WriteFile(file, raw, 0o644)
	case "import":
		var raw []byte
		var err error
		if file == "" || file == "-" {
			raw, err = io.ReadAll(os.Stdin)
		} else {
			raw, err = os.ReadFile(file)
		}
		if err != nil {
			return err
		}
		t, err := c.ImportTrace(ctx, base, raw)
		if err != nil {
			return err
		}
		fmt.Printf("imported a trace of %d chunks (%d bytes) for %s\n", t.Chunks, t.Bytes, t.Base)
		return nil
	case "delete":
		return c.DeleteTrace(ctx, base)
	case "stop":
		t, err := c.StopTrace(ctx, base)
		if err != nil {
			return err
		}
		fmt.Printf("recorded a trace of %d chunks over %d ms for %s\n", t.Chunks, t.DurationMS, t.Base)
		return nil
	}
	return errors.New(traceUsage)
}
