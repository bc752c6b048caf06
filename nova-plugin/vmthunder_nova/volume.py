"""Volume driver: the sidecar attaches the iSCSI volume, QEMU reads NBD."""

from nova import conf as nova_conf
from nova.virt.libvirt.volume import volume as libvirt_volume

from vmthunder_brick import VMThunderConnector
from vmthunder_nova import config

CONF = nova_conf.CONF


def _properties(connection_info):
    props = dict(connection_info.get("data") or {})
    props.setdefault("volume_id", connection_info.get("serial"))
    return props


class VMThunderVolumeDriver(libvirt_volume.LibvirtBaseVolumeDriver):
    def __init__(self, host, connector=None):
        super().__init__(host, is_block_dev=False)
        self.connector = connector or VMThunderConnector(socket_path=CONF.vmthunder.api_socket)

    def connect_volume(self, connection_info, instance):
        device_info = self.connector.connect_volume(_properties(connection_info))
        connection_info["data"]["device_path"] = device_info["path"]
        connection_info["data"]["vmthunder"] = device_info

    def disconnect_volume(self, connection_info, instance, force=False):
        self.connector.disconnect_volume(_properties(connection_info), None, force=force)

    def extend_volume(self, connection_info, instance, requested_size):
        return self.connector.extend_volume(_properties(connection_info))

    def get_config(self, connection_info, disk_info):
        conf = config.NBDGuestDisk.from_disk(super().get_config(connection_info, disk_info))
        info = connection_info["data"].get("vmthunder")
        if info is None:
            # Nova rebuilds XML (reboot, migration) from the saved
            # connection_info; ask the sidecar if the export was not recorded.
            info = self.connector.connect_volume(_properties(connection_info))
        conf.source_name = info["export_name"]
        conf.source_socket = info["socket"]
        conf.reconnect_delay = CONF.vmthunder.reconnect_delay or None
        return conf
