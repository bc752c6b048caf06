package daemon

import (
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/internal/fsutil"
	"github.com/vmthunder/vmthunder/sidecar/prefetch"
)

// Boot traces (package prefetch) belong to template bases only: a
// volume's cache, and so anything recorded about it, is dropped when its
// last export goes. A template base's id is the template's with its
// generation's suffix (stack.TemplateBaseID).
var templateBaseID = regexp.MustCompile(`\.g[0-9a-f]{12}$`)

func (d *Daemon) traceBase(id string) (string, error) {
	if err := api.ValidBase(id); err != nil {
		return "", err
	}
	if !templateBaseID.MatchString(id) {
		return "", api.BadRequest(api.CodeInvalid, "base %q is not a template generation (TEMPLATE.gHASH, as exports and `vmthunder bases` show it): only templates have boot traces, a volume's cache is dropped with its last export", id)
	}
	return filepath.Join(d.mgr.Dir(), id), nil
}

// Trace describes base id's boot trace and its replay.
func (d *Daemon) Trace(id string) (*api.Trace, error) {
	dir, err := d.traceBase(id)
	if err != nil {
		return nil, err
	}
	s := d.pf.Stats(id)
	out := &api.Trace{Base: id, Recording: s.Recording, Replaying: s.Replaying, BackedOff: s.BackedOff,
		PrefetchedChunks: s.Prefetched, PrefetchedBytes: s.PrefetchedBytes, HitChunks: s.Hits, WastedBytes: s.WastedBytes}
	t, err := prefetch.Load(dir)
	switch {
	case err == nil:
		out.Present, out.Chunks, out.ChunkSize, out.Bytes, out.DurationMS = true, len(t.Chunks), t.ChunkSize, t.Bytes(), int64(t.Duration())
		if s.FetchedFrom != "" {
			if raw, err := t.Encode(); err == nil && prefetch.Sum(raw) == s.FetchedSum {
				out.FromPeer = s.FetchedFrom
			}
		}
	case errors.Is(err, os.ErrNotExist):
		if !s.Recording {
			return nil, api.Errorf(http.StatusNotFound, api.CodeNotFound, "base %q has no boot trace and records none", id)
		}
	default:
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	return out, nil
}

// TraceData is base id's trace file, as export gives it and import takes it.
func (d *Daemon) TraceData(id string) ([]byte, error) {
	dir, err := d.traceBase(id)
	if err != nil {
		return nil, err
	}
	t, err := prefetch.Load(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, api.Errorf(http.StatusNotFound, api.CodeNotFound, "base %q has no boot trace", id)
	}
	if err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	return t.Encode()
}

// ImportTrace stores raw (a trace file) as base id's trace. The base's
// cache need not exist yet; the trace is replayed from the next export
// of the base on.
func (d *Daemon) ImportTrace(id string, body io.Reader) (*api.Trace, error) {
	dir, err := d.traceBase(id)
	if err != nil {
		return nil, err
	}
	raw, err := io.ReadAll(io.LimitReader(body, prefetch.MaxFileBytes+1))
	if err != nil {
		return nil, api.BadRequest(api.CodeInvalid, "reading the trace: %v", err)
	}
	if len(raw) > prefetch.MaxFileBytes {
		return nil, api.Errorf(http.StatusRequestEntityTooLarge, api.CodeTooLarge, "trace larger than %d bytes", prefetch.MaxFileBytes)
	}
	t, err := prefetch.Decode(raw)
	if err != nil {
		return nil, api.BadRequest(api.CodeInvalid, "%v", err)
	}
	if inf, ok := d.baseInfo(id); ok && inf.Size > 0 {
		if err := t.Fits(inf.Size); err != nil {
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "base %s: %v", id, err)
		}
	}
	if d.pf.Stats(id).Recording {
		return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "base %s is recording its own boot trace: stop it first (POST .../trace/stop)", id)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	if err := fsutil.SyncDir(d.mgr.Dir()); err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	if err := prefetch.Save(dir, t); err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	d.log.WithField("base", id).WithField("chunks", len(t.Chunks)).Info("boot trace imported")
	return d.Trace(id)
}

// DeleteTrace removes base id's trace (the next export records a new one).
func (d *Daemon) DeleteTrace(id string) error {
	dir, err := d.traceBase(id)
	if err != nil {
		return err
	}
	if _, err := os.Stat(prefetch.Path(dir)); errors.Is(err, os.ErrNotExist) {
		return api.Errorf(http.StatusNotFound, api.CodeNotFound, "base %q has no boot trace", id)
	}
	if err := prefetch.Remove(dir); err != nil {
		return api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	d.log.WithField("base", id).Info("boot trace deleted")
	return nil
}

// StopTrace ends base id's recording now and keeps what it recorded.
func (d *Daemon) StopTrace(id string) (*api.Trace, error) {
	if _, err := d.traceBase(id); err != nil {
		return nil, err
	}
	if err := d.pf.StopRecording(id); err != nil {
		if errors.Is(err, prefetch.ErrNoRecording) {
			return nil, api.Errorf(http.StatusConflict, api.CodeConflict, "base %q records no boot trace now", id)
		}
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	return d.Trace(id)
}

func (d *Daemon) baseInfo(id string) (api.Base, bool) {
	l, err := d.Bases()
	if err != nil {
		return api.Base{}, false
	}
	for _, b := range l {
		if b.ID == id {
			return b, true
		}
	}
	return api.Base{}, false
}

func (d *Daemon) hTraceImport(w http.ResponseWriter, r *http.Request) {
	t, err := d.ImportTrace(r.PathValue("id"), http.MaxBytesReader(w, r.Body, prefetch.MaxFileBytes+1))
	answer(w, http.StatusOK, t, err)
}

func (d *Daemon) hTraceExport(w http.ResponseWriter, r *http.Request) {
	raw, err := d.TraceData(r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	w.Write(raw)
}

func (d *Daemon) traceRoutes(mux *http.ServeMux, v string) {
	mux.HandleFunc("GET "+v+"/bases/{id}/trace", func(w http.ResponseWriter, r *http.Request) {
		t, err := d.Trace(r.PathValue("id"))
		answer(w, http.StatusOK, t, err)
	})
	mux.HandleFunc("DELETE "+v+"/bases/{id}/trace", func(w http.ResponseWriter, r *http.Request) {
		answer(w, http.StatusNoContent, nil, d.DeleteTrace(r.PathValue("id")))
	})
	mux.HandleFunc("POST "+v+"/bases/{id}/trace/stop", func(w http.ResponseWriter, r *http.Request) {
		t, err := d.StopTrace(r.PathValue("id"))
		answer(w, http.StatusOK, t, err)
	})
	mux.HandleFunc("GET "+v+"/bases/{id}/trace/data", d.hTraceExport)
	mux.HandleFunc("PUT "+v+"/bases/{id}/trace/data", d.hTraceImport)
}
