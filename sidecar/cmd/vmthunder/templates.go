package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/openstack"
)

func init() {
	register("templates", "list the template volumes published in Cinder", runTemplates)
}

func runTemplates(args []string) error {
	fs := flag.NewFlagSet("templates", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "ini config file with a [cinder] section (default "+defaultConfig+")")
	imageID := fs.String("image-id", "", "only the templates of this image")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg, err := loadCinder(*cfgPath)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := openstack.New(ctx, cfg.Cinder)
	if err != nil {
		return err
	}
	l, err := c.Templates(ctx, *imageID)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(map[string]any{"templates": l})
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VOLUME\tNAME\tIMAGE\tSIZE\tSTATUS\tCREATED\tGENERATION")
	for _, t := range l {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", t.VolumeID, t.Name, t.ImageID, t.Size, t.Status, t.CreatedAt, t.Generation)
	}
	return w.Flush()
}
