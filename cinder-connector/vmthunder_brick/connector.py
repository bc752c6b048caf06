"""An os-brick connector that hands a Cinder iSCSI volume to the sidecar.

The sidecar reads the target in user space and serves the volume as an NBD
export on a unix socket; this class only translates os-brick calls into API
calls. Nothing here touches the data.
"""

import os

from os_brick import exception
from os_brick.initiator.connectors import base

from vmthunder_brick.client import SidecarClient, SidecarError, default_socket

INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"


def export_id(connection_properties):
    """The export id: Cinder's volume id, which Nova also passes on detach."""
    vid = connection_properties.get("volume_id") or connection_properties.get("serial")
    if not vid:
        raise exception.BrickException(
            message="vmthunder: connection properties carry no volume_id (needed as the export id)"
        )
    return str(vid)


def _brick_error(err, volume_id=None):
    """Map a sidecar answer onto the os-brick exception callers expect."""
    if err.status == 404:
        return exception.VolumeDeviceNotFound(device=f"vmthunder export {volume_id}: {err.message}")
    if err.code == "unreachable":
        return exception.BrickException(message=str(err))
    if "portal" in err.message or "unreachable" in err.message:
        return exception.TargetPortalNotFound(target_portal=err.message)
    return exception.BrickException(message=str(err))


class VMThunderConnector(base.BaseLinuxConnector):
    """Attach volumes as VMThunder NBD exports (write-through)."""

    mode = "write-through"

    def __init__(self, root_helper="sudo", driver=None, execute=None, socket_path=None,
                 *args, **kwargs):
        super().__init__(root_helper, driver=driver, execute=execute, *args, **kwargs)
        self.client = SidecarClient(socket_path)

    @staticmethod
    def get_connector_properties(root_helper, *args, **kwargs):
        props = {"vmthunder_socket": kwargs.get("vmthunder_socket") or default_socket()}
        try:
            info = SidecarClient(props["vmthunder_socket"], timeout=5).info()
            props["initiator"] = info.get("initiator")
            props["vmthunder_host"] = info.get("host")
        except SidecarError:
            pass
        if not props.get("initiator") and os.path.exists(INITIATOR_FILE):
            with open(INITIATOR_FILE) as f:
                for line in f:
                    if line.startswith("InitiatorName="):
                        props["initiator"] = line.split("=", 1)[1].strip()
        return {k: v for k, v in props.items() if v}

    def get_search_path(self):
        return None

    @staticmethod
    def _device_info(export):
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
            return [self.client.get_export(export_id(connection_properties))["uri"]]
        except SidecarError as e:
            if e.status == 404:
                return []
            raise _brick_error(e) from e

    def get_all_available_volumes(self, connection_properties=None):
        try:
            return [e["uri"] for e in self.client.list_exports()]
        except SidecarError as e:
            raise _brick_error(e) from e

    def check_valid_device(self, path, run_as_root=True):
        try:
            return any(e["uri"] == path and e.get("state", "ready") == "ready"
                       for e in self.client.list_exports())
        except SidecarError:
            return False

    def connect_volume(self, connection_properties):
        vid = export_id(connection_properties)
        request = {"id": vid, "mode": self.mode, "connection_info": dict(connection_properties)}
        try:
            export = self.client.create_export(request)
        except SidecarError as e:
            if e.status != 409:
                raise _brick_error(e, vid) from e
            # Already attached on this node (a retried attach): reuse it.
            export = self.client.get_export(vid)
        return self._device_info(export)

    def disconnect_volume(self, connection_properties, device_info, force=False,
                          ignore_errors=False):
        vid = export_id(connection_properties)
        try:
            self.client.delete_export(vid)
        except SidecarError as e:
            if e.status == 404:
                return  # already gone: disconnect is idempotent
            if ignore_errors:
                return
            raise _brick_error(e, vid) from e

    def extend_volume(self, connection_properties):
        vid = export_id(connection_properties)
        try:
            return self.client.refresh_export(vid)["size"]
        except SidecarError as e:
            raise _brick_error(e, vid) from e
