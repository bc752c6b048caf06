"""Volume driver: the sidecar attaches the iSCSI volume, QEMU reads NBD."""

from nova import conf as nova_conf
from nova import exception
from nova.virt.libvirt.volume import volume as libvirt_volume

from vmthunder_brick import VMThunderConnector
from vmthunder_nova import config

CONF = nova_conf.CONF


def _properties(connection_info):
    props = dict(connection_info.get("data") or {})
    if not props.get("volume_id") and connection_info.get("serial"):
        props["volume_id"] = connection_info["serial"]
    return props


class VMThunderVolumeDriver(libvirt_volume.LibvirtBaseVolumeDriver):
    """Registered for driver_volume_type 'iscsi' by VMThunderDriver."""

    def __init__(self, host, connector=None):
        super().__init__(host, is_block_dev=False)
        self.connector = connector or VMThunderConnector(socket_path=CONF.vmthunder.api_socket)

    def connect_volume(self, connection_info, instance):
        device_info = self.connector.connect_volume(_properties(connection_info))
        # Nova saves connection_info in the BDM after an attach: the export
        # is then known when XML is rebuilt (reboot, live migration, where
        # the destination's connection_info carries its own export). No
        # device_path: an NBD URI is not a host block device, and nova
        # would use it as one (extend, encryptors).
        connection_info["data"]["vmthunder"] = device_info

    def disconnect_volume(self, connection_info, instance, force=False):
        self.connector.disconnect_volume(_properties(connection_info), None, force=force)

    def extend_volume(self, connection_info, instance, requested_size):
        """Cinder extended an attached volume. With no QEMU running the
        instance, the sidecar re-reads the volume's size (refresh) and the
        next start of the guest opens the export at its new size; nova then
        skips the block resize. A running QEMU cannot follow: its NBD
        client cannot grow a disk ("Cannot grow NBD nodes"), and a refresh
        re-assembles the export under it, cutting its connection. Then this
        refuses before anything changes (nova answers
        ExtendVolumeNotSupported); the guest sees the new size after a
        stop and start."""
        if self._qemu_running(instance):
            raise NotImplementedError("VMThunder NBD disks cannot grow while the guest runs")
        return self.connector.extend_volume(_properties(connection_info))

    def _qemu_running(self, instance):
        try:
            return self.host.get_guest(instance).is_active()
        except exception.InstanceNotFound:
            return False  # no domain, no QEMU: nova itself reports it next

    def get_config(self, connection_info, disk_info):
        conf = config.NBDGuestDisk.from_disk(super().get_config(connection_info, disk_info))
        info = connection_info["data"].get("vmthunder")
        if info is None:
            # An attachment made before the plugin recorded its export:
            # connecting is idempotent and answers the existing export.
            info = self.connector.connect_volume(_properties(connection_info))
            connection_info["data"]["vmthunder"] = info
        conf.source_name = info["export_name"]
        conf.source_socket = info["socket"]
        conf.reconnect_delay = CONF.vmthunder.reconnect_delay or None
        if CONF.vmthunder.io_error_policy == "stop":
            # libvirt 9.0 drops <reconnect>: without it QEMU fails the
            # requests a sidecar restart catches. Stopped, the guest sees no
            # error, and its requests are retried when resume.py resumes it.
            conf.error_policy = conf.rerror_policy = "stop"
        return conf
