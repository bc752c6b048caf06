package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/config"
	"github.com/vmthunder/vmthunder/sidecar/origin"
	"github.com/vmthunder/vmthunder/sidecar/peers"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

func init() {
	register("peers", "list the peers cluster's members: state, since when, bases served, chunk bytes to and from each", runPeers)
	register("manifest", "make a template's chunk manifest from its origin (at publish time), or import one", runManifest)
}

func runPeers(args []string) error {
	fs := flag.NewFlagSet("peers", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := cliCtx()
	defer cancel()
	v, err := newClient().Peers(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(v)
	}
	if !v.Enabled {
		fmt.Println("peers are not enabled on this node ([peers] enabled = true)")
		return nil
	}
	return printPeers(os.Stdout, *v, time.Now())
}

// printPeers writes the members as a table: state and how long it has
// held, the bases each serves (or served, when gone), the chunk bytes
// this node received from it and served to it.
func printPeers(out io.Writer, v api.Peers, now time.Time) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "MEMBER\tSTATE\tSINCE\tRECEIVED\tSERVED\tGOSSIP\tCHUNKS\tBASES")
	for _, m := range v.Members {
		name := m.Name
		if m.Self {
			name += " (self)"
		}
		bases := strings.Join(m.Bases, ",")
		if bases == "" {
			bases = "-"
		}
		since := "-"
		if !m.Since.IsZero() {
			since = now.Sub(m.Since).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", name, m.State, since, m.ReceivedBytes, m.ServedBytes, m.Gossip, m.ChunkAddr, bases)
	}
	return w.Flush()
}

const manifestUsage = `usage:
  vmthunder manifest make --origin URL|PATH [--chunk-size 64K] -o FILE
      read the template's origin once and write its manifest (prints the root)
  vmthunder manifest import BASE FILE [--root sha256:HEX]
      store FILE as template base BASE's manifest on this node's daemon`

func runManifest(args []string) error {
	if len(args) == 0 {
		return errors.New(manifestUsage)
	}
	switch args[0] {
	case "make":
		fs := flag.NewFlagSet("manifest make", flag.ContinueOnError)
		orig := fs.String("origin", "", "the template's origin: a path or iscsi://... URL (required)")
		chunk := fs.String("chunk-size", "64K", "chunk size: the nodes' [cache] chunk_size")
		out := fs.String("o", "", "manifest file to write (required)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *orig == "" || *out == "" {
			return errors.New(manifestUsage)
		}
		cs, err := config.ParseSize(*chunk)
		if err != nil {
			return fmt.Errorf("--chunk-size: %w", err)
		}
		o, err := absOrigin(*orig)
		if err != nil {
			return err
		}
		dev, err := stack.OpenOrigin(origin.Spec{URL: o, ReadOnly: true})
		if err != nil {
			return err
		}
		defer dev.Close()
		m, err := peers.ComputeManifest(context.Background(), dev, cs)
		if err != nil {
			return err
		}
		if err := m.WriteFile(*out); err != nil {
			return err
		}
		fmt.Printf("%s: %d chunks of %d bytes, root %s\n", *out, m.Chunks(), m.ChunkSize, m.Root())
		return nil
	case "import":
		fs := flag.NewFlagSet("manifest import", flag.ContinueOnError)
		root := fs.String("root", "", "refuse a manifest whose root digest is not this one")
		rest := args[1:]
		var pos []string
		for len(rest) > 0 {
			if err := fs.Parse(rest); err != nil {
				return err
			}
			rest = fs.Args()
			if len(rest) > 0 {
				pos, rest = append(pos, rest[0]), rest[1:]
			}
		}
		if len(pos) != 2 {
			return errors.New(manifestUsage)
		}
		raw, err := os.ReadFile(pos[1])
		if err != nil {
			return err
		}
		ctx, cancel := cliCtx()
		defer cancel()
		m, err := newClient().ImportManifest(ctx, pos[0], raw, *root)
		if err != nil {
			return err
		}
		fmt.Printf("imported the manifest of %s: %d chunks of %d bytes, root %s\n", m.Base, m.Chunks, m.ChunkSize, m.Root)
		return nil
	}
	return errors.New(manifestUsage)
}
