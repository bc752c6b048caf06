"""HTTP/JSON over the sidecar's unix socket (docs/api.md), stdlib only."""

import http.client
import json
import os
import socket
import urllib.parse

DEFAULT_SOCKET = "/run/vmthunder/api.sock"


def default_socket():
    return os.environ.get("VMTHUNDER_SOCKET", DEFAULT_SOCKET)


# Codes the client itself gives (status 0): no answer came from the sidecar.
SIDECAR_UNREACHABLE = "sidecar_unreachable"  # the API socket refused, or the connection broke
TIMEOUT = "timeout"  # sent, but no answer within the timeout


class SidecarError(Exception):
    """An answer from the sidecar that is not a success, or no answer."""

    def __init__(self, status, code, message, sent=True):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        # False only when the request never reached the sidecar: a create
        # that timed out (code "timeout") may still be running there.
        self.sent = sent

    def __str__(self):
        return f"sidecar: {self.message} ({self.code or self.status})"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SidecarClient:
    """Thin client: one method per API call, answers as dicts."""

    def __init__(self, socket_path=None, timeout=120):
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout

    def _call(self, method, path, body=None, timeout=None):
        timeout = self.timeout if timeout is None else timeout
        conn = _UnixHTTPConnection(self.socket_path, timeout)
        try:
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"} if data else {}
            try:
                conn.request(method, "/v1" + path, body=data, headers=headers)
            except OSError as e:
                raise SidecarError(
                    0, SIDECAR_UNREACHABLE, f"cannot reach the sidecar at {self.socket_path}: {e}", sent=False
                ) from e
            try:
                resp = conn.getresponse()
                raw = resp.read()
            except TimeoutError as e:
                raise SidecarError(
                    0, TIMEOUT, f"no answer from the sidecar at {self.socket_path} within {timeout:g}s"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                raise SidecarError(
                    0, SIDECAR_UNREACHABLE, f"lost the sidecar at {self.socket_path}: {e!r}"
                ) from e
        finally:
            conn.close()
        payload = {}
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": raw.decode(errors="replace")}
        if resp.status >= 400:
            raise SidecarError(resp.status, payload.get("code", ""), payload.get("error", resp.reason))
        return payload

    @staticmethod
    def _id(export_id):
        return urllib.parse.quote(export_id, safe="")

    def info(self):
        return self._call("GET", "/info")

    def create_export(self, request, timeout=None):
        """timeout: seconds to wait for the answer (the sidecar answers a
        create once the export is ready); default the client's."""
        return self._call("POST", "/exports", request, timeout=timeout)

    def create(self, export_id, mode, template_volume=None, cow_path=None, timeout=None, **fields):
        """Create an export from keyword fields. template_volume: a Cinder
        volume published as a template (docs/api.md): the sidecar takes the
        origin, base and generation from it, so origin, connection_info,
        base and generation must not be given with it."""
        request = {"id": export_id, "mode": mode}
        if template_volume is not None:
            request["template_volume"] = template_volume
        if cow_path is not None:
            request["cow_path"] = cow_path
        request.update({k: v for k, v in fields.items() if v is not None})
        return self.create_export(request, timeout=timeout)

    def templates(self, image_id=None):
        """Published templates, newest first; only those of image_id when
        given. The sidecar answers 503 cinder_unconfigured without a
        [cinder] section and 502 cinder_error when Cinder fails."""
        path = "/templates"
        if image_id is not None:
            path += "?" + urllib.parse.urlencode({"image_id": image_id})
        return self._call("GET", path).get("templates", [])

    def get_export(self, export_id):
        return self._call("GET", f"/exports/{self._id(export_id)}")

    def list_exports(self):
        return self._call("GET", "/exports").get("exports", [])

    def delete_export(self, export_id, delete_cow=False):
        """delete_cow: also remove the export's COW store (a disk gone for good)."""
        query = "?delete_cow=true" if delete_cow else ""
        self._call("DELETE", f"/exports/{self._id(export_id)}{query}")

    def refresh_export(self, export_id):
        return self._call("POST", f"/exports/{self._id(export_id)}/refresh")
