package daemon

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/vmthunder/vmthunder/sidecar/api"
	"github.com/vmthunder/vmthunder/sidecar/origin/iscsi"
)

// Handler is the API (and /metrics) as an http.Handler.
func (d *Daemon) Handler() http.Handler {
	mux := http.NewServeMux()
	v := "/" + api.Version
	mux.HandleFunc("POST "+v+"/exports", d.hCreate)
	mux.HandleFunc("GET "+v+"/exports", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.ExportList{Exports: d.List()})
	})
	mux.HandleFunc("GET "+v+"/exports/{id}", func(w http.ResponseWriter, r *http.Request) {
		e, err := d.Get(r.PathValue("id"))
		answer(w, http.StatusOK, e, err)
	})
	mux.HandleFunc("DELETE "+v+"/exports/{id}", d.hDelete)
	mux.HandleFunc("POST "+v+"/exports/{id}/refresh", func(w http.ResponseWriter, r *http.Request) {
		e, err := d.Refresh(r.PathValue("id"))
		answer(w, http.StatusOK, e, err)
	})
	mux.HandleFunc("GET "+v+"/bases", func(w http.ResponseWriter, r *http.Request) {
		l, err := d.Bases()
		answer(w, http.StatusOK, api.BaseList{Bases: l}, err)
	})
	mux.HandleFunc("GET "+v+"/bases/{id}", func(w http.ResponseWriter, r *http.Request) {
		b, err := d.Base(r.PathValue("id"))
		answer(w, http.StatusOK, b, err)
	})
	mux.HandleFunc("DELETE "+v+"/bases/{id}", func(w http.ResponseWriter, r *http.Request) {
		err := d.DeleteBase(r.PathValue("id"))
		answer(w, http.StatusNoContent, nil, err)
	})
	mux.HandleFunc("POST "+v+"/bases/{id}/warm", d.hWarm)
	d.traceRoutes(mux, v)    // trace.go
	d.peerRoutes(mux, v)     // peers.go
	d.templateRoutes(mux, v) // templates.go
	mux.HandleFunc("GET "+v+"/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.Health())
	})
	mux.HandleFunc("GET "+v+"/info", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.Info())
	})
	mux.HandleFunc("GET "+v+"/stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.Stats())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Errorf(http.StatusNotFound, api.CodeNotFound, "no endpoint %s %s", r.Method, r.URL.Path))
	})
	return d.logRequests(mux)
}

func (d *Daemon) hCreate(w http.ResponseWriter, r *http.Request) {
	req, err := api.DecodeCreate(http.MaxBytesReader(w, r.Body, api.MaxBody))
	if err != nil {
		writeError(w, err)
		return
	}
	e, err := d.Create(req)
	answer(w, http.StatusCreated, e, err)
}

func (d *Daemon) hDelete(w http.ResponseWriter, r *http.Request) {
	del := false
	if s := r.URL.Query().Get("delete_cow"); s != "" {
		var err error
		if del, err = strconv.ParseBool(s); err != nil {
			writeError(w, api.BadRequest(api.CodeInvalid, "delete_cow=%q is not a boolean", s))
			return
		}
	}
	answer(w, http.StatusNoContent, nil, d.Delete(r.PathValue("id"), del))
}

func (d *Daemon) hWarm(w http.ResponseWriter, r *http.Request) {
	req, err := api.DecodeWarm(http.MaxBytesReader(w, r.Body, api.MaxBody))
	if err != nil {
		writeError(w, err)
		return
	}
	st, err := d.Warm(r.PathValue("id"), req)
	answer(w, http.StatusAccepted, st, err)
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(c int) { s.status = c; s.ResponseWriter.WriteHeader(c) }

// logRequests logs each call at debug level, failures at info (the
// message is the answer's, which never carries a password).
func (d *Daemon) logRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: 200}
		h.ServeHTTP(sw, r)
		f := d.log.WithFields(logrus.Fields{"method": r.Method, "path": r.URL.Path, "status": sw.status, "ms": time.Since(t).Milliseconds()})
		if sw.status >= 400 {
			f.Info("api request failed")
		} else {
			f.Debug("api request")
		}
	})
}

func answer(w http.ResponseWriter, status int, v any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	if status == http.StatusNoContent {
		w.WriteHeader(status)
		return
	}
	writeJSON(w, status, v)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	var ae *api.Error
	if !errors.As(err, &ae) {
		ae = api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%s", iscsi.Redact(err.Error()))
	}
	if ae.Status == 0 {
		ae.Status = http.StatusInternalServerError
	}
	writeJSON(w, ae.Status, ae)
}

func (d *Daemon) serveAPI() error {
	ln, err := d.listenAPI() // root:api_group (access.go), not nbd_group
	if err != nil {
		return err
	}
	d.apiLn = ln
	d.apiSrv = &http.Server{Handler: d.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := d.apiSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.WithError(err).Error("api server stopped")
		}
	}()
	return nil
}

func (d *Daemon) serveMetrics() error {
	ln, err := net.Listen("tcp", d.cfg.MetricsListen)
	if err != nil {
		return err
	}
	d.metricsLn = ln
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
	d.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := d.metricsSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.WithError(err).Error("metrics server stopped")
		}
	}()
	d.log.WithField("listen", ln.Addr().String()).Info("metrics listening")
	return nil
}

// Health says the daemon is up (status is always "ok" when it answers),
// with how many exports could not be re-created.
func (d *Daemon) Health() api.Health {
	d.mu.Lock()
	defer d.mu.Unlock()
	h := api.Health{Status: "ok", Exports: len(d.exports)}
	for _, e := range d.exports {
		if e.state == stateError {
			h.Failed++
		}
	}
	return h
}

// Info is the node's identity for os-brick's get_connector_properties.
func (d *Daemon) Info() api.Info {
	host, _ := os.Hostname()
	// The iscsi origin logs in with this name, so it is what Cinder must
	// allow (os-brick's connector properties carry it).
	return api.Info{Host: host, Initiator: iscsi.DefaultInitiator(), Version: Version, APIVersion: api.Version,
		NBDSocketDir: d.cfg.NBDSocketDir, StateDir: d.cfg.StateDir, CacheDir: d.cfg.CacheDir, ChunkSize: d.cfg.ChunkSize}
}
