"""VMThunderDriver: nova's LibvirtDriver with iSCSI volumes served by the sidecar."""

from lxml import etree
from nova import conf as nova_conf
from nova.virt.libvirt import driver as libvirt_driver

from vmthunder_nova import conf, config, resume, volume

CONF = nova_conf.CONF
conf.register(CONF)


class VMThunderDriver(libvirt_driver.LibvirtDriver):
    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        # Extending attached volumes: the capability is the host's, for
        # every volume type it attaches. VMThunder volumes are extended
        # through the sidecar's refresh while their guest is stopped, and
        # refused while it runs (VMThunderVolumeDriver.extend_volume).
        self.capabilities = dict(self.capabilities, supports_extend_volume=True)
        self.resumer = None
        if CONF.vmthunder.enabled:
            # Nova fills volume_drivers lazily, per driver_volume_type, from
            # its own table; an entry set here is used instead.
            self.volume_drivers["iscsi"] = volume.VMThunderVolumeDriver(self._host)
            if CONF.vmthunder.io_error_policy == "stop" and CONF.vmthunder.resume_interval > 0:
                self.resumer = resume.IOErrorResumer(
                    self._host.get_connection,
                    self.volume_drivers["iscsi"].connector.client,
                    CONF.vmthunder.resume_interval,
                )

    def init_host(self, host):
        super().init_host(host)
        if self.resumer is not None:
            self.resumer.start()

    def cleanup_host(self, host):
        if self.resumer is not None:
            self.resumer.stop()
        super().cleanup_host(host)

    def _get_guest_disk_device(self, guest, disk_dev, volume_uuid=None, from_persistent_config=False):
        """Nova parses the guest's disks with the stock class, which cannot
        format a unix-socket NBD source again (detach formats the device it
        found): re-parse such a disk with NBDGuestDisk."""
        dev = super()._get_guest_disk_device(
            guest, disk_dev, volume_uuid=volume_uuid, from_persistent_config=from_persistent_config
        )
        if dev is None or getattr(dev, "source_protocol", None) != "nbd":
            return dev
        return find_nbd_disk(guest, dev.target_dev, from_persistent_config) or dev


def find_nbd_disk(guest, target_dev, from_persistent_config=False):
    """The NBDGuestDisk for target_dev in a nova Guest's XML, or None."""
    doc = etree.fromstring(guest.get_xml_desc(dump_inactive=from_persistent_config))
    for node in doc.findall("./devices/disk"):
        target = node.find("target")
        if target is not None and target.get("dev") == target_dev and config.NBDGuestDisk.is_unix_nbd(node):
            disk = config.NBDGuestDisk()
            disk.parse_dom(node)
            return disk
    return None
