"""Root disks of image-backed instances over their image's template base.

An image published as a VMThunder template (a read-only Cinder volume,
`vmthunder publish`) is opened once per node by the sidecar and cached
there; each instance's root disk is a copy-on-write export over it, with
the per-instance store in the instance directory. Nova's image cache is not
involved: nothing is downloaded from Glance.

Whether an instance's root disk is such an export is decided once per
spawn (driver.VMThunderDriver.spawn) and kept in the instance's
system_metadata, so every later path (reboot, start, resize, delete) finds
the same answer on any node without asking Cinder again.
"""

import os
import threading
import time

from nova import conf as nova_conf
from nova.virt.libvirt import imagebackend
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging

from vmthunder_brick import SidecarError
from vmthunder_nova import config

CONF = nova_conf.CONF
LOG = logging.getLogger(__name__)

# system_metadata key: the Cinder template volume the root disk is over.
TEMPLATE_KEY = "vmthunder_template_volume"
# The COW store's name in the instance directory (the sidecar keeps its
# bitmap beside it, STORE_NAME + ".bitmap").
STORE_NAME = "disk.vmthunder"
# How long a create another thread started may take before we give up.
CREATE_WAIT = 120.0

# While the sidecar opens a template on this node it attaches the volume in
# Cinder, which holds it in status reserved/attaching until the attachment
# completes; the sidecar lists and opens only available or in-use templates.
# So this node's template lookups and export creates take turns (a create
# is answered once its export is ready). Other nodes' attaches can still
# race with them: the sidecar must accept those states (reported, issue 13).
TEMPLATE_CALLS = threading.Lock()


def template_of(instance):
    """The template volume id the instance's root disk is over, or None."""
    return (instance.system_metadata or {}).get(TEMPLATE_KEY) or None


def export_id(instance):
    return f"{instance.uuid}.disk"


def store_path(instance_dir):
    return os.path.join(instance_dir, STORE_NAME)


def store_files(instance_dir):
    """The store and its bitmap as they exist in instance_dir."""
    try:
        names = os.listdir(instance_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n == STORE_NAME or n.startswith(STORE_NAME + "."))


def move_store(src_dir, dst_dir):
    """Move the COW store (and bitmap) between an instance's directories
    (Nova renames the directory to <uuid>_resize for a resize). A rename
    keeps the file root's with one link, as the sidecar requires of a store
    it resumes; a copy made by nova's user would be refused."""
    moved = []
    for name in store_files(src_dir):
        os.rename(os.path.join(src_dir, name), os.path.join(dst_dir, name))
        moved.append(name)
    return moved


def apply_disk_policy(conf):
    """The reconnect and error policies every VMThunder disk gets (see
    volume.VMThunderVolumeDriver.get_config)."""
    conf.reconnect_delay = CONF.vmthunder.reconnect_delay or None
    if CONF.vmthunder.io_error_policy == "stop":
        conf.error_policy = conf.rerror_policy = "stop"
    return conf


class TemplateRoot(imagebackend.Image):
    """An instance's root disk: the sidecar's cow export `<uuid>.disk` over
    the template volume recorded in its system_metadata, store
    `<instance dir>/disk.vmthunder`."""

    def __init__(self, instance=None, disk_name=None, path=None, disk_info_mapping=None, client=None):
        path = path or store_path(libvirt_utils.get_instance_path(instance))
        super().__init__(path, "network", "raw", is_block_dev=False, disk_info_mapping=disk_info_mapping)
        self.instance = instance
        self.template_volume = template_of(instance)
        self.client = client

    def exists(self):
        return os.path.exists(self.path)

    def _get_export(self):
        try:
            return self.client.get_export(export_id(self.instance))
        except SidecarError as e:
            if e.code == "not_found":
                return None
            raise

    def ensure_export(self):
        """The export serving this disk, created when missing. An export of
        the id over another template (left from before a rebuild) or
        another store is replaced, its store kept (the caller's cleanup
        decides about stores)."""
        eid = export_id(self.instance)
        deadline = time.monotonic() + CREATE_WAIT
        while True:
            export = self._get_export()
            if export is not None and export.get("state") == "creating" and time.monotonic() < deadline:
                time.sleep(0.5)  # another thread's create of it is under way
                continue
            if export is not None:
                same_store = os.path.realpath(export.get("cow_path") or "") == os.path.realpath(self.path)
                if export.get("template_volume") == self.template_volume and same_store:
                    return export
                LOG.warning(
                    "vmthunder: export %s is over template %s at %s, not %s at %s: replacing it",
                    eid,
                    export.get("template_volume"),
                    export.get("cow_path"),
                    self.template_volume,
                    self.path,
                    instance=self.instance,
                )
                self.client.delete_export(eid)
            try:
                with TEMPLATE_CALLS:
                    export = self.client.create(
                        eid, "cow", template_volume=self.template_volume, cow_path=self.path
                    )
            except SidecarError as e:
                if e.code == "exists" and time.monotonic() < deadline:
                    continue  # made meanwhile by another thread: look again
                raise
            LOG.info(
                "vmthunder: root disk %s is a cow export over template %s (base %s)",
                eid,
                self.template_volume,
                export.get("base"),
                instance=self.instance,
            )
            return export

    def cache(self, fetch_func, filename, size=None, safe=False, *args, **kwargs):
        """Nova's image-cache step: here, open the export. Nothing is
        fetched: the template's blocks come through the sidecar's cache."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        export = self.ensure_export()
        if size and size > export.get("size", 0):
            # A cow export has its base's size; growing it is not built.
            LOG.warning(
                "vmthunder: the flavor asks for a %d-byte root disk; it keeps its template's %d bytes",
                size,
                export.get("size", 0),
                instance=self.instance,
            )

    def create_image(self, prepare_template, base, size, safe=False, *args, **kwargs):
        self.cache(prepare_template, base, size, safe)

    def resize_image(self, size):
        LOG.warning(
            "vmthunder: a template root disk keeps its template's size (asked: %d bytes)",
            size,
            instance=self.instance,
        )

    def get_disk_size(self, name):
        export = self._get_export()
        return export.get("size", 0) if export else 0

    def get_model(self, connection):
        # Nova's file injection opens the disk through this; the export is
        # NBD served by the sidecar, not a file Nova may mount.
        raise NotImplementedError("file injection into a VMThunder template root disk is not supported")

    def snapshot_extract(self, target, out_format):
        raise NotImplementedError("snapshots of VMThunder template root disks are not built")

    @staticmethod
    def is_file_in_instance_path():
        return True

    def libvirt_info(self, cache_mode, extra_specs, boot_order=None, disk_unit=None):
        disk = config.NBDGuestDisk.from_disk(
            super().libvirt_info(cache_mode, extra_specs, boot_order=boot_order, disk_unit=disk_unit)
        )
        export = self.ensure_export()
        disk.source_path = None
        disk.source_name = export["export_name"]
        disk.source_socket = export["socket"]
        return apply_disk_policy(disk)


class Backend(imagebackend.Backend):
    """Nova's image backends, with the root disk of an instance recorded as
    over a template answered by TemplateRoot. Every other disk (ephemeral,
    swap, config drive, rescue) stays with the configured backend."""

    def __init__(self, use_cow, client):
        super().__init__(use_cow)
        self.client = client

    def by_name(self, instance, name, image_type=None, disk_info_mapping=None):
        if name == "disk" and template_of(instance):
            return TemplateRoot(
                instance=instance, disk_name=name, disk_info_mapping=disk_info_mapping, client=self.client
            )
        return super().by_name(instance, name, image_type=image_type, disk_info_mapping=disk_info_mapping)
