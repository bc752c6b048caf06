package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/api/client"
)

func init() {
	register("attach", "create an export on the daemon (prints its NBD URI)", runAttach)
	register("detach", "remove an export from the daemon", runDetach)
	register("list", "list the daemon's exports", runList)
	register("warm", "copy a base whole into the node's cache, with progress", runWarm)
	register("bases", "list the node's base caches", runBases)
	register("status", "daemon health, node identity and totals", runStatus)
	register("stats", "node counters as JSON", runStats)
}

func newClient() *client.Client { return client.New(apiSocket) }

// cliTimeout bounds one CLI call against a hung daemon.
var cliTimeout = 10 * time.Minute

func cliCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), cliTimeout)
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// absOrigin makes a relative path absolute (the daemon runs elsewhere);
// URLs are left alone.
func absOrigin(o string) (string, error) {
	if o == "" || strings.Contains(o, "://") || filepath.IsAbs(o) {
		return o, nil
	}
	return filepath.Abs(o)
}

func runAttach(args []string) error {
	fs := flag.NewFlagSet("attach", flag.ContinueOnError)
	id := fs.String("id", "", "export id (required): the NBD export name and socket name")
	orig := fs.String("origin", "", "origin: a path or iscsi://[user[%password]@]host[:port]/iqn/lun")
	ci := fs.String("connection-info", "", "origin as Cinder connection_info JSON (instead of --origin)")
	base := fs.String("base", "", "template: exports of one template generation share a cache that outlives them (default: the origin volume's own base)")
	generation := fs.String("generation", "", "the template's content version (required with --base), e.g. the image checksum")
	mode := fs.String("mode", api.ModeCOW, "cow, write-through or readonly")
	cow := fs.String("cow", "", "copy-on-write store (mode cow; default STATE_DIR/cow/ID.img)")
	tmplVol := fs.String("template-volume", "", "a Cinder template volume (vmthunder publish) instead of --origin/--base/--generation")
	asJSON := fs.Bool("json", false, "print the export as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	o, err := absOrigin(*orig)
	if err != nil {
		return err
	}
	cowPath := *cow
	if cowPath != "" && !filepath.IsAbs(cowPath) {
		if cowPath, err = filepath.Abs(cowPath); err != nil {
			return err
		}
	}
	req := api.CreateRequest{ID: *id, Origin: o, Base: *base, Generation: *generation, Mode: *mode, CowPath: cowPath, TemplateVolume: *tmplVol}
	if *ci != "" {
		if err := json.Unmarshal([]byte(*ci), &req.ConnectionInfo); err != nil {
			return fmt.Errorf("--connection-info: %w", err)
		}
	}
	ctx, cancel := cliCtx()
	defer cancel()
	e, err := newClient().Create(ctx, req)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(e)
	}
	printExport(e)
	return nil
}

func printExport(e *api.Export) {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "id\t%s\nuri\t%s\nsocket\t%s\nmode\t%s\nbase\t%s\nsize\t%d\norigin\t%s\nstate\t%s\n",
		e.ID, e.URI, e.Socket, e.Mode, e.Base, e.Size, e.Origin, e.State)
	if e.CowPath != "" {
		fmt.Fprintf(w, "cow\t%s\n", e.CowPath)
	}
	if e.Error != "" {
		fmt.Fprintf(w, "error\t%s\n", e.Error)
	}
	w.Flush()
}

func runDetach(args []string) error {
	fs := flag.NewFlagSet("detach", flag.ContinueOnError)
	delCOW := fs.Bool("delete-cow", false, "also delete the export's copy-on-write store")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: vmthunder detach [--delete-cow] ID")
	}
	ctx, cancel := cliCtx()
	defer cancel()
	return newClient().Delete(ctx, fs.Arg(0), *delCOW)
}

func runList(args []string) error {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print {\"exports\": [...]} as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := cliCtx()
	defer cancel()
	l, err := newClient().List(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(api.ExportList{Exports: l})
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tMODE\tSTATE\tSIZE\tBASE\tURI")
	for _, e := range l {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", e.ID, e.Mode, e.State, e.Size, e.Base, e.URI)
	}
	return w.Flush()
}

func runWarm(args []string) error {
	fs := flag.NewFlagSet("warm", flag.ContinueOnError)
	orig := fs.String("origin", "", "origin to fill a template from when no export of it is attached")
	generation := fs.String("generation", "", "with --origin: BASE is a template and this its generation")
	noWait := fs.Bool("no-wait", false, "start the warm-up and return")
	traceOnly := fs.Bool("trace-only", false, "fill only the chunks of the base's boot trace (a template's), not the whole base")
	quiet := fs.Bool("q", false, "no progress bar")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: vmthunder warm [--origin URL|PATH --generation G] [--trace-only] [--no-wait] BASE")
	}
	base := fs.Arg(0)
	o, err := absOrigin(*orig)
	if err != nil {
		return err
	}
	var req *api.WarmRequest
	if o != "" || *generation != "" || *traceOnly {
		req = &api.WarmRequest{Origin: o, Generation: *generation, TraceOnly: *traceOnly}
	}
	c := newClient()
	ctx, cancel := cliCtx()
	st, err := c.Warm(ctx, base, req)
	cancel()
	if err != nil {
		return err
	}
	if st.Base != "" {
		base = st.Base
	}
	if *noWait {
		fmt.Printf("warm-up of %s %s: %d of %d bytes\n", base, st.State, st.DoneBytes, st.TotalBytes)
		return nil
	}
	var bar *progressbar.ProgressBar
	if !*quiet {
		bar = progressbar.DefaultBytes(st.TotalBytes, "warm "+base)
	}
	for {
		// A bound per poll, not for the whole wait: a large base may take
		// longer than cliTimeout to warm, and that is not a failure.
		ctx, cancel := cliCtx()
		b, err := c.Base(ctx, base)
		cancel()
		if err != nil {
			return err
		}
		if b.Warm == nil {
			return fmt.Errorf("base %s has no warm-up", base)
		}
		if bar != nil {
			bar.ChangeMax64(b.Warm.TotalBytes)
			bar.Set64(b.Warm.DoneBytes)
		}
		switch b.Warm.State {
		case api.WarmDone:
			if bar != nil {
				bar.Finish()
				fmt.Fprintln(os.Stderr)
			}
			return nil
		case api.WarmFailed:
			return fmt.Errorf("warm-up of %s failed: %s", base, b.Warm.Error)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func runBases(args []string) error {
	fs := flag.NewFlagSet("bases", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := cliCtx()
	defer cancel()
	l, err := newClient().Bases(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(api.BaseList{Bases: l})
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "BASE\tSIZE\tPRESENT\tEXPORTS\tWARM")
	for _, b := range l {
		warm := "-"
		if b.Warm != nil {
			warm = fmt.Sprintf("%s %d/%d", b.Warm.State, b.Warm.DoneBytes, b.Warm.TotalBytes)
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%s\n", b.ID, b.Size, b.PresentBytes, b.Exports, warm)
	}
	return w.Flush()
}

func runStatus(args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c := newClient()
	ctx, cancel := cliCtx()
	defer cancel()
	h, err := c.Health(ctx)
	if err != nil {
		return err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return err
	}
	st, err := c.Stats(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(map[string]any{"health": h, "info": info, "stats": st})
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "status\t%s\nversion\t%s\nhost\t%s\ninitiator\t%s\nexports\t%d (%d failed)\nbases\t%d\n",
		h.Status, info.Version, info.Host, info.Initiator, h.Exports, h.Failed, st.Bases)
	fmt.Fprintf(w, "read\t%d bytes (%d from cache, %d from origin)\nwritten\t%d bytes\ncache disk\t%d bytes (budget %d)\n",
		st.ReadBytes, st.CacheHitBytes, st.OriginBytes, st.WriteBytes, st.CacheDiskBytes, st.CacheBudget)
	return w.Flush()
}

func runStats(args []string) error {
	if len(args) != 0 {
		return errors.New("usage: vmthunder stats")
	}
	ctx, cancel := cliCtx()
	defer cancel()
	st, err := newClient().Stats(ctx)
	if err != nil {
		return err
	}
	return printJSON(st)
}
