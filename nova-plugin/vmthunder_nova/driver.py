"""VMThunderDriver: nova's LibvirtDriver with iSCSI volumes and the root
disks of image-backed instances served by the sidecar."""

import os

from lxml import etree
from nova import conf as nova_conf
from nova import exception
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging

from vmthunder_brick import SidecarClient, SidecarError
from vmthunder_nova import conf, config, imagebackend, resume, volume

CONF = nova_conf.CONF
conf.register(CONF)
LOG = logging.getLogger(__name__)

LIVE_MIGRATION_REFUSED = (
    "the instance's root disk is a VMThunder copy-on-write export over a template; "
    "live migration of such instances is not supported (its store would have to be "
    "block-migrated while the guest writes it). Cold-migrate or resize it instead"
)


class VMThunderDriver(libvirt_driver.LibvirtDriver):
    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        # Extending attached volumes: the capability is the host's, for
        # every volume type it attaches. VMThunder volumes are extended
        # through the sidecar's refresh while their guest is stopped, and
        # refused while it runs (VMThunderVolumeDriver.extend_volume).
        self.capabilities = dict(self.capabilities, supports_extend_volume=True)
        self.resumer = None
        self.sidecar = SidecarClient(socket_path=CONF.vmthunder.api_socket)
        if CONF.vmthunder.template_root_disks:
            self.image_backend = imagebackend.Backend(CONF.use_cow_images, self.sidecar)
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

    # Image-backed root disks over templates (imagebackend.py). The choice
    # is made at spawn (rebuild and evacuate spawn too) and recorded in the
    # instance; the export lives while the domain is defined: cleanup (every
    # destroy: delete, hard reboot, rebuild, revert) removes it, and the
    # next XML build (libvirt_info) makes it again over the same store.

    def spawn(
        self, context, instance, image_meta, injected_files, admin_password, allocations, *args, **kwargs
    ):
        block_device_info = kwargs.get("block_device_info")
        if block_device_info is None and len(args) > 1:
            block_device_info = args[1]
        self._choose_root_disk(instance, image_meta, block_device_info)
        return super().spawn(
            context, instance, image_meta, injected_files, admin_password, allocations, *args, **kwargs
        )

    def _choose_root_disk(self, instance, image_meta, block_device_info):
        sysmeta = instance.system_metadata
        had = sysmeta.get(imagebackend.TEMPLATE_KEY)
        template = None
        if CONF.vmthunder.template_root_disks and not self._is_booted_from_volume(block_device_info):
            template = self._template_for(instance, image_meta)
        if template:
            sysmeta[imagebackend.TEMPLATE_KEY] = template
        else:
            sysmeta.pop(imagebackend.TEMPLATE_KEY, None)
        if had != template:
            instance.save()

    def _template_for(self, instance, image_meta):
        """The newest template volume of the instance's image, or None with
        a warning saying why the instance boots the stock way."""
        image_id = image_meta.id if "id" in image_meta else instance.image_ref
        if not image_id:
            return None
        try:
            with imagebackend.TEMPLATE_CALLS:
                templates = self.sidecar.templates(image_id=image_id)
        except SidecarError as e:
            LOG.warning(
                "vmthunder: cannot list the templates of image %s (%s): the root disk comes from "
                "Nova's image cache",
                image_id,
                e,
                instance=instance,
            )
            return None
        ready = [t for t in templates if t.get("image_id") == image_id and t.get("volume_id")]
        if ready:
            return ready[0]["volume_id"]
        if CONF.vmthunder.publish_missing_templates:
            # TODO(issue 13): publish on demand (the sidecar has no publish
            # call; `vmthunder publish --image` is an operator command).
            LOG.warning(
                "vmthunder: image %s has no VMThunder template and publishing one on demand "
                "([vmthunder] publish_missing_templates) is not built yet: the root disk comes from "
                "Nova's image cache; publish it with `vmthunder publish --image %s`",
                image_id,
                image_id,
                instance=instance,
            )
        else:
            LOG.warning(
                "vmthunder: image %s has no VMThunder template: the root disk comes from Nova's image "
                "cache, not shared with other instances of the image; publish one with "
                "`vmthunder publish --image %s`",
                image_id,
                image_id,
                instance=instance,
            )
        return None

    def _drop_root_export(self, instance, delete_store):
        """Remove the instance's root export, if the sidecar has one, and
        with delete_store its COW store too."""
        eid = imagebackend.export_id(instance)
        try:
            self.sidecar.delete_export(eid, delete_cow=delete_store)
        except SidecarError as e:
            if e.code != "not_found":
                raise
            return False
        LOG.info(
            "vmthunder: removed export %s%s", eid, " and its store" if delete_store else "", instance=instance
        )
        return True

    def cleanup(
        self, context, instance, network_info, block_device_info=None, destroy_disks=True, *args, **kwargs
    ):
        # The domain is gone here; its export goes with it. The store is
        # the instance's disk: kept unless the disks are destroyed.
        if imagebackend.template_of(instance):
            self._drop_root_export(instance, delete_store=destroy_disks)
        return super().cleanup(
            context, instance, network_info, block_device_info, destroy_disks, *args, **kwargs
        )

    def migrate_disk_and_power_off(self, context, instance, dest, flavor, network_info, *args, **kwargs):
        if not imagebackend.template_of(instance):
            return super().migrate_disk_and_power_off(
                context, instance, dest, flavor, network_info, *args, **kwargs
            )
        inst_base = libvirt_utils.get_instance_path(instance)
        if not self._is_path_shared_with(dest, inst_base):
            # A store copied by nova's user would not be root's, and the
            # destination's sidecar refuses to resume such a file.
            raise exception.InstanceFaultRollback(
                exception.MigrationPreCheckError(
                    reason="the instance's root disk is a VMThunder copy-on-write export; it can be "
                    "resized or migrated only where its instance directory is shared (the same host "
                    "or shared instance storage)"
                )
            )
        disk_info = super().migrate_disk_and_power_off(
            context, instance, dest, flavor, network_info, *args, **kwargs
        )
        # The guest is off and the store is in <uuid>_resize now: close it
        # there; finish_migration moves it into the new directory.
        self._drop_root_export(instance, delete_store=False)
        return disk_info

    def finish_migration(self, context, migration, instance, *args, **kwargs):
        if imagebackend.template_of(instance):
            inst_base = libvirt_utils.get_instance_path(instance)
            os.makedirs(inst_base, exist_ok=True)
            moved = imagebackend.move_store(inst_base + "_resize", inst_base)
            LOG.debug("vmthunder: moved %s into %s", moved, inst_base, instance=instance)
        return super().finish_migration(context, migration, instance, *args, **kwargs)

    def finish_revert_migration(self, context, instance, *args, **kwargs):
        if imagebackend.template_of(instance):
            inst_base = libvirt_utils.get_instance_path(instance)
            if os.path.isdir(inst_base + "_resize"):
                # Nova removes the new directory and renames the old one
                # back: the store goes back into the old one first.
                self._drop_root_export(instance, delete_store=False)
                imagebackend.move_store(inst_base, inst_base + "_resize")
        return super().finish_revert_migration(context, instance, *args, **kwargs)

    def snapshot(self, context, instance, image_id, update_task_state):
        if imagebackend.template_of(instance):
            # Nova's snapshot reads a local file or block device; the root
            # disk is an NBD export (TODO: convert it from the export).
            raise NotImplementedError(
                "snapshots of instances whose root disk is a VMThunder template export are not built yet"
            )
        return super().snapshot(context, instance, image_id, update_task_state)

    def check_can_live_migrate_source(self, context, instance, dest_check_data, block_device_info=None):
        if imagebackend.template_of(instance):
            raise exception.MigrationPreCheckError(reason=LIVE_MIGRATION_REFUSED)
        return super().check_can_live_migrate_source(context, instance, dest_check_data, block_device_info)

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
