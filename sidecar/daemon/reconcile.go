package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
	"github.com/vmthunder/vmthunder/sidecar/stack"
)

// A create that makes a new COW store marks it in state_dir/creating/ID
// until the export is in the table: a daemon killed in between leaves a
// store no export owns and no client was ever given, which the next start
// removes instead of letting a later create with that id adopt it.

func (d *Daemon) creatingDir() string { return filepath.Join(d.cfg.StateDir, "creating") }

// markNewStore records that the create of id is making the store at path;
// it returns false when the store exists already (it is resumed, and is
// not this create's to remove).
func (d *Daemon) markNewStore(id, path string) (bool, error) {
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	dir := d.creatingDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("state_dir: %w", err)
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, id), []byte(path), 0o600); err != nil {
		return false, fmt.Errorf("state_dir: %w", err)
	}
	return true, nil
}

func (d *Daemon) unmarkNewStore(id string) {
	if err := os.Remove(filepath.Join(d.creatingDir(), id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.WithError(err).WithField("export", id).Warn("removing create marker")
	}
}

// reconcile removes, before the table's exports are re-created, what a
// crash left that the table does not own: COW stores of creates that never
// finished, socket files of no export, and volume caches (a volume's cache
// lives only while it has exports). Each removal is logged.
func (d *Daemon) reconcile(recs []Record) {
	owned := map[string]Record{}
	for _, r := range recs {
		owned[r.ID] = r
	}
	if marks, err := os.ReadDir(d.creatingDir()); err == nil {
		for _, m := range marks {
			id := m.Name()
			p := filepath.Join(d.creatingDir(), id)
			raw, err := os.ReadFile(p)
			store := string(raw)
			if r, ok := owned[id]; err == nil && (!ok || r.CowPath != store) && filepath.IsAbs(store) && d.cowAllowed(store) {
				if err := d.removeCow(store, stack.RemoveCOW); err != nil {
					d.log.WithError(err).WithFields(map[string]any{"export": id, "cow_path": store}).Warn("could not remove the cow store of an unfinished create")
				} else {
					d.log.WithFields(map[string]any{"export": id, "cow_path": store}).Warn("removed the cow store of a create that did not finish (no client was given it)")
				}
			}
			os.Remove(p)
		}
	}
	if socks, err := os.ReadDir(d.cfg.NBDSocketDir); err == nil {
		for _, s := range socks {
			id, ok := strings.CutSuffix(s.Name(), ".sock")
			if !ok || s.Type()&os.ModeSocket == 0 {
				continue
			}
			if _, own := owned[id]; own {
				continue
			}
			p := filepath.Join(d.cfg.NBDSocketDir, s.Name())
			if err := os.Remove(p); err == nil {
				d.log.WithField("socket", p).Warn("removed a socket file no export owns")
			}
		}
	}
	dropped, err := d.mgr.DropStale()
	for _, id := range dropped {
		d.log.WithField("base", id).Info("dropped a volume cache no export holds (a volume's cache is not kept across attachments)")
	}
	if err != nil {
		d.log.WithError(err).Warn("dropping stale caches")
	}
}
