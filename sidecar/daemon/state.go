package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
)

// Record is one export as persisted in state_dir/exports.json: enough to
// re-create it after a restart with the same socket, COW store and cache.
// It holds the CHAP password of a connection_info origin, so the file is
// mode 0600 and its content never reaches the API or the logs.
type Record struct {
	ID             string         `json:"id"`
	Origin         string         `json:"origin,omitempty"`
	ConnectionInfo map[string]any `json:"connection_info,omitempty"`
	Base           string         `json:"base"`
	Generation     string         `json:"generation,omitempty"` // set: Base is a template
	Mode           string         `json:"mode"`
	CowPath        string         `json:"cow_path,omitempty"`
	// TemplateVolume: the export is over this Cinder template volume
	// (templates.go); Base and Generation are its, and the origin is this
	// node's attachment of it, made again after a restart.
	TemplateVolume string `json:"template_volume,omitempty"`
	// ChunkSize is the template's (its metadata's): every node's cache of
	// it has the same chunks, as peers' manifests need. 0: the default.
	ChunkSize int64     `json:"chunk_size,omitempty"`
	Created   time.Time `json:"created"`
}

type stateFile struct {
	Version int      `json:"version"`
	Exports []Record `json:"exports"`
}

const stateVersion = 1

func (d *Daemon) statePath() string { return filepath.Join(d.cfg.StateDir, "exports.json") }

// loadState reads the export table; a missing file is an empty table.
func loadState(path string) ([]Record, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state %s: %w", path, err)
	}
	var s stateFile
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state %s is corrupt: %w (move it away to start with no exports)", path, err)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("state %s has version %d, this daemon reads %d", path, s.Version, stateVersion)
	}
	seen := map[string]bool{}
	cows := map[string]string{}
	for _, r := range s.Exports {
		if seen[r.ID] {
			return nil, fmt.Errorf("state %s lists export %q twice: it was edited by hand or is damaged; keep one record of it and start again", path, r.ID)
		}
		seen[r.ID] = true
		if r.CowPath == "" {
			continue
		}
		if other, ok := cows[r.CowPath]; ok {
			return nil, fmt.Errorf("state %s gives exports %q and %q one cow_path %s: keep one and start again", path, other, r.ID, r.CowPath)
		}
		cows[r.CowPath] = r.ID
	}
	return s.Exports, nil
}

// writeState replaces the table atomically: a reader (or a restart after a
// crash) sees the old table or the new one, never a mix. The temp file is
// fsynced before the rename and the directory after it, so the rename
// itself is durable.
func writeState(path string, recs []Record) error {
	sort.Slice(recs, func(i, j int) bool { return recs[i].ID < recs[j].ID })
	if recs == nil {
		recs = []Record{}
	}
	b, err := json.MarshalIndent(stateFile{Version: stateVersion, Exports: recs}, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}
