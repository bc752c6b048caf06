"""An os-brick connector that hands a Cinder iSCSI volume to the sidecar.

The sidecar reads the target in user space and serves the volume as an NBD
export on a unix socket; this class only translates os-brick calls into API
calls (docs/api.md). Nothing here touches the data.
"""

import os
import time

from os_brick import exception
from os_brick.initiator.connectors import base
from oslo_config import cfg
from oslo_log import log as logging

from vmthunder_brick.client import TIMEOUT, SidecarClient, SidecarError, default_socket

LOG = logging.getLogger(__name__)

GROUP = "vmthunder"

# Registered on the global CONF, as os-brick's own connectors do: in
# nova-compute that is nova's CONF, so they go in nova.conf's [vmthunder].
# Arguments to VMThunderConnector override them.
connector_opts = [
    cfg.FloatOpt(
        "create_wait",
        default=5.0,
        min=0,
        help="Seconds an attach waits for an export another attach is still creating "
        "(state creating) to become ready.",
    ),
    cfg.FloatOpt(
        "create_timeout",
        default=120.0,
        min=1,
        help="Seconds an attach waits for the sidecar to make its export (the sidecar "
        "answers once the origin is open); on a timeout the export is deleted again.",
    ),
    cfg.FloatOpt(
        "cleanup_wait",
        default=60.0,
        min=0,
        help="Seconds a failed attach waits for the sidecar to finish the create it "
        "timed out on, to delete the export that create makes.",
    ),
    cfg.FloatOpt(
        "retry_interval",
        default=1.0,
        min=0,
        help="Seconds before the first retry of an attach whose iSCSI target did not "
        "answer; each further retry waits twice as long (os-brick's "
        "device_scan_attempts sets how many attempts).",
    ),
]

cfg.CONF.register_opts(connector_opts, group=GROUP)


def list_opts():
    """The connector's options, for oslo-config-generator."""
    return [(GROUP, connector_opts)]


INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"

# Sidecar error codes (docs/api.md, "Error codes in the os-brick connector")
# and the os-brick exception each becomes. Only the code decides: the
# message is for people and is passed on unchanged.
_INVALID_CODES = ("bad_json", "unknown_field", "missing_field", "invalid", "bad_origin", "forbidden")
# Retried by connect_volume (device_scan_attempts in all, as os-brick's iSCSI
# connector retries a portal login): a portal that did not answer may be
# back in a moment. Everything else fails at once; auth_failed above all,
# since retrying bad credentials only adds failed logins on the target.
RETRIED_CODES = ("target_unreachable",)


def export_id(connection_properties, fixed_id=None):
    """The export id: Cinder's volume id, which Nova also passes on detach."""
    vid = (
        fixed_id
        or connection_properties.get("vmthunder_export_id")
        or connection_properties.get("volume_id")
        or connection_properties.get("serial")
    )
    if not vid:
        raise exception.InvalidParameterValue(
            err="vmthunder: connection properties carry no volume_id (needed as the export id)"
        )
    return str(vid)


def brick_error(err, volume_id=None):
    """Map a sidecar answer onto the os-brick exception callers expect, by
    its code alone, keeping the sidecar's own message (it names the cause)."""
    msg = f"vmthunder export {volume_id}: {err}" if volume_id else str(err)
    code = err.code
    if code == "not_found":
        return exception.VolumeDeviceNotFound(device=msg)
    if code in _INVALID_CODES:
        return exception.InvalidParameterValue(err=msg)
    if code == "auth_failed":
        return exception.FailedISCSITargetPortalLogin(message=msg)
    if code == "target_unreachable":
        return exception.TargetPortalNotFound(message=msg)
    if code == "no_such_target":
        return exception.VolumeDeviceNotFound(message=msg)
    # origin_error, conflict, base_conflict, exists, too_large, internal,
    # and no answer at all (sidecar_unreachable, timeout).
    return exception.BrickException(message=msg)


class VMThunderConnector(base.BaseLinuxConnector):
    """Attach volumes as VMThunder NBD exports.

    socket_path: the sidecar's API socket (default $VMTHUNDER_SOCKET or
    /run/vmthunder/api.sock). export_id: a fixed export id instead of the
    volume id. mode: the export mode for read-write attachments (a Cinder
    volume is write-through: nothing acknowledged may live only here).
    create_wait, create_timeout, cleanup_wait, retry_interval: as the
    [vmthunder] options of the same names (connector_opts), which they
    default to. On a create_timeout, or any failure after the sidecar made
    the export, the export is deleted again (an export this attach reused
    is left alone).
    device_scan_attempts (os-brick's): attempts at an unreachable target.
    """

    def __init__(
        self,
        root_helper="sudo",
        driver=None,
        execute=None,
        *args,
        socket_path=None,
        export_id=None,
        mode="write-through",
        create_wait=None,
        create_timeout=None,
        cleanup_wait=None,
        retry_interval=None,
        **kwargs,
    ):
        super().__init__(root_helper, driver, execute, *args, **kwargs)
        self.client = SidecarClient(socket_path)
        self.export_id = export_id
        self.mode = mode
        conf = cfg.CONF[GROUP]
        self.create_wait = conf.create_wait if create_wait is None else create_wait
        self.create_timeout = conf.create_timeout if create_timeout is None else create_timeout
        self.cleanup_wait = conf.cleanup_wait if cleanup_wait is None else cleanup_wait
        self.retry_interval = conf.retry_interval if retry_interval is None else retry_interval

    def _id(self, connection_properties):
        return export_id(connection_properties, self.export_id)

    @staticmethod
    def get_connector_properties(root_helper, *args, **kwargs):
        """What Cinder needs to export a volume to this node: the initiator
        name the sidecar logs in with, and where the sidecar listens."""
        props = {"vmthunder_socket": kwargs.get("vmthunder_socket") or default_socket()}
        try:
            info = SidecarClient(props["vmthunder_socket"], timeout=5).info()
            props["initiator"] = info.get("initiator")
            props["vmthunder_host"] = info.get("host")
        except SidecarError:
            pass  # sidecar down: the iSCSI initiator file still names the node
        if not props.get("initiator") and os.path.exists(INITIATOR_FILE):
            with open(INITIATOR_FILE) as f:
                for line in f:
                    if line.startswith("InitiatorName="):
                        props["initiator"] = line.split("=", 1)[1].strip()
        return {k: v for k, v in props.items() if v}

    def get_search_path(self):
        return None  # exports are sockets, not entries in a /dev directory

    @staticmethod
    def device_info(export):
        return {
            "type": "nbd",
            "path": export["uri"],
            "uri": export["uri"],
            "socket": export["socket"],
            "export_name": export["export_name"],
            "size": export.get("size"),
        }

    def get_volume_paths(self, connection_properties):
        try:
            return [self.client.get_export(self._id(connection_properties))["uri"]]
        except SidecarError as e:
            if e.code == "not_found":
                return []
            raise brick_error(e) from e

    def get_all_available_volumes(self, connection_properties=None):
        try:
            return [e["uri"] for e in self.client.list_exports()]
        except SidecarError as e:
            raise brick_error(e) from e

    def check_valid_device(self, path, run_as_root=True):
        try:
            return any(e["uri"] == path for e in self.client.list_exports())
        except SidecarError:
            return False

    def connect_volume(self, connection_properties):
        vid = self._id(connection_properties)
        mode = "readonly" if connection_properties.get("access_mode") == "ro" else self.mode
        request = {"id": vid, "mode": mode, "connection_info": _data(connection_properties)}
        made = []  # [True] once the sidecar is making this attach's own export
        try:
            export = self._create_or_reuse(vid, request, made)
            if export.get("state") == "error":
                # An existing export the sidecar could not re-create after a
                # restart: nothing serves its socket.
                msg = f"vmthunder export {vid}: not served: {export.get('error')}"
                raise exception.BrickException(message=msg)
            return self.device_info(export)
        except BaseException:
            if made:
                self._remove_own(vid)
            raise

    def _create_or_reuse(self, vid, request, made):
        deadline = time.monotonic() + self.create_wait
        pause = 0.05
        attempt = 1
        while True:
            try:
                export = self.client.create_export(request, timeout=self.create_timeout)
                made.append(True)
            except SidecarError as e:
                if e.code == TIMEOUT:
                    # The sidecar got the create and is still at it (an
                    # iSCSI login that hangs): the export it is making is
                    # this attach's, and must not outlive it.
                    made.append(True)
                    msg = (
                        f"vmthunder export {vid}: not ready within create_timeout "
                        f"({self.create_timeout:g}s): {e}"
                    )
                    raise exception.BrickException(message=msg) from e
                if e.code in RETRIED_CODES and attempt < self.device_scan_attempts:
                    wait = self.retry_interval * 2 ** (attempt - 1)
                    LOG.warning(
                        "vmthunder export %s: attempt %d of %d failed, retrying in %gs: %s",
                        vid,
                        attempt,
                        self.device_scan_attempts,
                        wait,
                        e,
                    )
                    attempt += 1
                    time.sleep(wait)
                    continue
                if e.code != "exists":  # a 409 "conflict" names another cause
                    raise brick_error(e, vid) from e
                # Already exported on this node (a retried attach, a reboot
                # rebuilding the XML, another attachment of a multiattach
                # volume): reuse it if it is what this attach asks for.
                try:
                    export = self.client.get_export(vid)
                except SidecarError as e2:
                    if e2.code == "not_found" and time.monotonic() < deadline:
                        continue  # its create failed meanwhile: try ours
                    raise brick_error(e2, vid) from e2
                check_reuse(vid, request, export)
            if export.get("state") != "creating":
                return export
            # Another attach is still creating it: its socket does not exist
            # yet.
            if time.monotonic() >= deadline:
                msg = (
                    f"vmthunder export {vid}: still in state creating after "
                    f"{self.create_wait:g}s (another attach is making it); retry the attach"
                )
                raise exception.BrickException(message=msg)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _remove_own(self, vid):
        """Delete the export this failed attach made. A create that timed
        out is still running in the sidecar (the export is busy until it
        ends): wait up to cleanup_wait for it."""
        deadline = time.monotonic() + self.cleanup_wait
        pause = 0.1
        while True:
            try:
                self.client.delete_export(vid)
                LOG.info("vmthunder export %s: deleted after the attach that made it failed", vid)
                return
            except SidecarError as e:
                if e.code == "not_found":
                    return  # the create failed in the end: nothing was left
                if e.code == "conflict" and time.monotonic() < deadline:
                    time.sleep(pause)  # busy: its create is still running
                    pause = min(pause * 2, 1.0)
                    continue
                LOG.error(
                    "vmthunder export %s: the attach that made it failed, and deleting it failed too "
                    "(delete it with `vmthunder detach %s`): %s",
                    vid,
                    vid,
                    e,
                )
                return

    def disconnect_volume(self, connection_properties, device_info, force=False, ignore_errors=False):
        # Nova passes no device_info: the properties name the export.
        vid = self._id(connection_properties)
        try:
            self.client.delete_export(vid)
        except SidecarError as e:
            if e.code == "not_found" or ignore_errors:
                return  # already gone: disconnect is idempotent
            raise brick_error(e, vid) from e

    def extend_volume(self, connection_properties):
        vid = self._id(connection_properties)
        try:
            return self.client.refresh_export(vid)["size"]
        except SidecarError as e:
            raise brick_error(e, vid) from e


def _access(mode):
    return "read-only" if mode == "readonly" else "read-write"


def _asked_targets(ci):
    """The (target IQN, LUN) pairs Cinder's iscsi data names."""
    pairs = list(zip(ci.get("target_iqns") or [], ci.get("target_luns") or [], strict=False))
    pairs.append((ci.get("target_iqn"), ci.get("target_lun")))
    out = set()
    for iqn, lun in pairs:
        try:
            if iqn:
                out.add((str(iqn), int(lun)))
        except (TypeError, ValueError):
            pass
    return out


def _served_targets(origin):
    """The (target IQN, LUN) pairs of an export's origin as the sidecar
    reports it: iscsi://[user%***@]host:port/IQN/LUN, comma-separated."""
    out = set()
    for part in (origin or "").split(","):
        if not part.startswith("iscsi://"):
            continue
        pieces = part.rsplit("/", 2)
        try:
            out.add((pieces[1], int(pieces[2])))
        except (IndexError, ValueError):
            pass
    return out


def check_reuse(vid, request, export):
    """Refuse an existing export that is not what this attach asks for: QEMU
    would otherwise get a disk in the wrong mode (a read-write attach handed
    a read-only export fails with an unclear error) or of another target."""
    want, have = request["mode"], export.get("mode")
    if have != want:
        msg = (
            f"vmthunder export {vid} already exists on this node with mode {have!r} "
            f"({_access(have)}), this attach asks for mode {want!r} ({_access(want)}); "
            "one export serves one mode: detach the other attachment first"
        )
        raise exception.InvalidParameterValue(err=msg)
    asked = _asked_targets(request["connection_info"])
    served = _served_targets(export.get("origin"))
    if asked and served and not asked & served:
        wanted = ", ".join(f"{iqn} LUN {lun}" for iqn, lun in sorted(asked))
        msg = (
            f"vmthunder export {vid} already exists on this node for origin "
            f"{export.get('origin')}, this attach asks for target {wanted}"
        )
        raise exception.InvalidParameterValue(err=msg)


def _data(props):
    # Cinder's data dict as is (the sidecar reads the iSCSI keys and ignores
    # Nova's), minus what the Nova plugin recorded in it after an attach.
    return {k: v for k, v in props.items() if k not in ("vmthunder", "device_path")}
