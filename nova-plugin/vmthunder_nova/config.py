"""Libvirt disk XML for an NBD export on a unix socket.

Nova's LibvirtConfigGuestDisk only knows network hosts with a name and a
port; a unix-socket host (and QEMU's reconnect element, and the error
policies it does not model) needs this subclass, which also parses such a
disk back so detach can format it again.
"""

from lxml import etree
from nova.virt.libvirt import config as vconfig


class NBDGuestDisk(vconfig.LibvirtConfigGuestDisk):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.source_type = "network"
        self.source_protocol = "nbd"
        self.source_socket = None
        self.reconnect_delay = None
        # libvirt's <driver error_policy rerror_policy>: what QEMU does on
        # a failed write / read (stop: pause the guest, retry on resume).
        self.error_policy = None
        self.rerror_policy = None

    @classmethod
    def from_disk(cls, disk):
        """Copy a stock disk config (what the base volume driver built)."""
        conf = cls()
        for k, v in vars(disk).items():
            if k not in ("root_name", "ns_prefix", "ns_uri"):
                setattr(conf, k, v)
        conf.source_type = "network"
        conf.source_protocol = "nbd"
        conf.source_hosts, conf.source_ports = [], []
        return conf

    def format_dom(self):
        hosts, ports = self.source_hosts, self.source_ports
        self.source_hosts, self.source_ports = [], []
        try:
            dev = super().format_dom()
        finally:
            self.source_hosts, self.source_ports = hosts, ports
        driver = dev.find("driver")
        for attr in ("error_policy", "rerror_policy"):
            if getattr(self, attr) and driver is not None:
                driver.set(attr, getattr(self, attr))
        source = dev.find("source")
        if source is not None and self.source_socket:
            etree.SubElement(source, "host", transport="unix", socket=self.source_socket)
            if self.reconnect_delay:
                etree.SubElement(source, "reconnect", delay=str(self.reconnect_delay))
        return dev

    def parse_dom(self, xmldoc):
        super().parse_dom(xmldoc)
        driver = xmldoc.find("driver")
        if driver is not None:
            self.error_policy = driver.get("error_policy")
            self.rerror_policy = driver.get("rerror_policy")
        source = xmldoc.find("source")
        if source is None:
            return
        host = source.find("host")
        if host is not None and host.get("transport") == "unix":
            self.source_socket = host.get("socket")
            self.source_hosts, self.source_ports = [], []
        reconnect = source.find("reconnect")
        if reconnect is not None:
            self.reconnect_delay = int(reconnect.get("delay"))

    @staticmethod
    def is_unix_nbd(node):
        """True for a <disk> element whose source is NBD over a unix socket."""
        src = node.find("source")
        host = src.find("host") if src is not None else None
        return (
            src is not None
            and src.get("protocol") == "nbd"
            and host is not None
            and host.get("transport") == "unix"
        )
