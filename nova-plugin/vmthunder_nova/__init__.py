"""Nova plugin for VMThunder: libvirt disks served by the sidecar over NBD."""
