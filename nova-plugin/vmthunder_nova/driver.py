"""VMThunderDriver: nova's LibvirtDriver with volumes routed through the sidecar."""

from lxml import etree
from nova import conf as nova_conf
from nova.virt.libvirt import driver as libvirt_driver

from vmthunder_nova import conf, config, volume

CONF = nova_conf.CONF
conf.register(CONF)

ROUTED_TYPES = ("iscsi",)


class VMThunderDriver(libvirt_driver.LibvirtDriver):
    def _get_volume_driver(self, connection_info):
        if CONF.vmthunder.enabled and connection_info.get("driver_volume_type") in ROUTED_TYPES:
            drv = self.volume_drivers.get("vmthunder")
            if drv is None:
                drv = self.volume_drivers["vmthunder"] = volume.VMThunderVolumeDriver(self._host)
            return drv
        return super()._get_volume_driver(connection_info)

    def _get_guest_disk_device(self, guest, disk_dev, volume_uuid=None,
                               from_persistent_config=False):
        """Nova parses disks with the stock class, which cannot format a
        unix-socket NBD source again: re-parse ours with NBDGuestDisk."""
        dev = super()._get_guest_disk_device(guest, disk_dev, volume_uuid=volume_uuid,
                                             from_persistent_config=from_persistent_config)
        if dev is None or getattr(dev, "source_protocol", None) != "nbd":
            return dev
        return find_nbd_disk(guest, dev.target_dev, from_persistent_config) or dev


def find_nbd_disk(guest, target_dev, from_persistent_config=False):
    import libvirt

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if from_persistent_config else 0
    doc = etree.fromstring(guest._domain.XMLDesc(flags))
    for node in doc.findall("./devices/disk"):
        target = node.find("target")
        if target is not None and target.get("dev") == target_dev and config.NBDGuestDisk.is_unix_nbd(node):
            disk = config.NBDGuestDisk()
            disk.parse_dom(node)
            return disk
    return None
