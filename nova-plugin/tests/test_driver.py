"""The Nova driver against real nova 34 classes, a real libvirtd and QEMU,
and running sidecars over a tgtd origin."""

import copy
import os
import subprocess
import sys
import time
import uuid

import pytest
from lxml import etree

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import pyharness  # noqa: E402


def load_driver():
    from nova.virt import driver

    return driver.load_compute_driver(None, "vmthunder.VMThunderDriver")


def test_nova_loads_the_driver_by_its_short_name(nova_conf):
    import nova.virt
    import nova.virt.vmthunder
    from nova.virt.libvirt.driver import LibvirtDriver

    # Nothing of the plugin is inside nova's tree (an editable nova would
    # miss it): the plugin's import finder answers the name.
    assert not nova.virt.vmthunder.__file__.startswith(os.path.dirname(nova.virt.__file__) + os.sep)

    d = load_driver()
    assert isinstance(d, LibvirtDriver)
    assert type(d).__module__ == "vmthunder_nova.driver"
    assert nova_conf.vmthunder.enabled is True
    assert nova_conf.vmthunder.reconnect_delay == 5
    assert nova_conf.vmthunder.api_socket == "/run/vmthunder/api.sock"


def test_only_iscsi_is_routed(nova_conf):
    from nova.virt.libvirt.volume.iscsi import LibvirtISCSIVolumeDriver
    from nova.virt.libvirt.volume.nfs import LibvirtNFSVolumeDriver

    from vmthunder_nova.volume import VMThunderVolumeDriver

    d = load_driver()
    assert isinstance(d.volume_drivers["iscsi"], VMThunderVolumeDriver)
    assert isinstance(d._get_volume_driver({"driver_volume_type": "iscsi"}), VMThunderVolumeDriver)
    assert isinstance(d._get_volume_driver({"driver_volume_type": "nfs"}), LibvirtNFSVolumeDriver)
    nova_conf.set_override("enabled", False, group="vmthunder")
    try:
        off = load_driver()
        assert type(off._get_volume_driver({"driver_volume_type": "iscsi"})) is LibvirtISCSIVolumeDriver
    finally:
        nova_conf.clear_override("enabled", group="vmthunder")


def nbd_disk(name="vol-1", sock="/run/vmthunder/nbd/vol-1.sock", dev="vdb"):
    from vmthunder_nova.config import NBDGuestDisk

    disk = NBDGuestDisk()
    disk.source_device = "disk"
    disk.driver_name, disk.driver_format, disk.driver_cache = "qemu", "raw", "none"
    disk.source_name = name
    disk.source_socket = sock
    disk.reconnect_delay = 5
    disk.error_policy = disk.rerror_policy = "stop"
    disk.target_dev, disk.target_bus = dev, "virtio"
    disk.serial = name
    return disk


def test_nbd_disk_round_trips_and_stock_class_cannot(nova_conf):
    from nova.virt.libvirt import config as vconfig

    from vmthunder_nova.config import NBDGuestDisk

    node = etree.fromstring(nbd_disk().to_xml())
    assert node.get("type") == "network" and node.get("device") == "disk"
    assert node.find("driver").attrib == {
        "name": "qemu",
        "type": "raw",
        "cache": "none",
        "error_policy": "stop",
        "rerror_policy": "stop",
    }
    src = node.find("source")
    assert src.get("protocol") == "nbd" and src.get("name") == "vol-1"
    assert src.find("host").attrib == {"transport": "unix", "socket": "/run/vmthunder/nbd/vol-1.sock"}
    assert src.find("reconnect").get("delay") == "5"
    assert node.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    back = NBDGuestDisk()
    back.parse_dom(node)
    assert back.source_socket == "/run/vmthunder/nbd/vol-1.sock" and back.reconnect_delay == 5
    assert back.error_policy == back.rerror_policy == "stop"
    assert etree.tostring(etree.fromstring(back.to_xml())) == etree.tostring(node)
    # The reason for the subclass: nova's own class cannot format it again.
    stock = vconfig.LibvirtConfigGuestDisk()
    stock.parse_dom(node)
    with pytest.raises(TypeError):
        stock.to_xml()


DOMAIN = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
  <controller type='scsi' index='0' model='virtio-scsi'/>{disks}</devices>
</domain>"""


class Domain:
    """A uniquely named domain (others share this libvirtd), always removed."""

    def __init__(self, conn, disks="", doc=None):
        import libvirt

        self.libvirt = libvirt
        self.uuid = str(uuid.uuid4())
        self.name = f"vmt-test-{self.uuid[:8]}"
        if doc is None:
            xml = DOMAIN.format(name=self.name, uuid=self.uuid, disks=disks)
        else:
            doc.find("name").text, doc.find("uuid").text = self.name, self.uuid
            xml = etree.tostring(doc).decode()
        self.dom = conn.defineXML(xml)
        self.removed = False

    def xml(self, inactive=False):
        flags = self.libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return etree.fromstring(self.dom.XMLDesc(flags))

    def disk(self, dev, inactive=False):
        return self.xml(inactive).find(f"./devices/disk/target[@dev='{dev}']/..")

    def capacity(self, dev):
        out = subprocess.run(
            ["virsh", "-c", "qemu:///system", "domblkinfo", self.name, dev],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return int(out.split("Capacity:")[1].split()[0])

    def remove(self):
        if self.removed:
            return
        self.removed = True
        try:
            self.dom.destroy()
        except self.libvirt.libvirtError:
            pass
        self.dom.undefine()


@pytest.fixture
def domains(libvirt_conn):
    made = []

    def make(disks="", doc=None):
        made.append(Domain(libvirt_conn, disks, doc))
        return made[-1]

    yield make
    for d in made:
        d.remove()


def instance_for(dom):
    from nova import objects

    class Instance(objects.Instance):
        def save(self, *a, **kw):
            pass  # no nova database here; attach_volume saves device metadata

    return Instance(
        uuid=dom.uuid,
        system_metadata={},
        flavor=objects.Flavor(extra_specs={}),
        image_ref="",
        host="localhost",
    )


def driver_for(nova_conf, sidecar):
    nova_conf.set_override("api_socket", sidecar.api_socket, group="vmthunder")
    try:
        drv = load_driver()
    finally:
        nova_conf.clear_override("api_socket", group="vmthunder")
    # The only stub: device metadata comes from nova's database.
    drv._build_device_metadata = lambda ctx, inst: None
    return drv


def connection_info(tgt):
    """What Cinder's LVM/tgt backend hands Nova: the volume id is the serial."""
    vol_id = str(uuid.uuid4())
    data = tgt.connection_info(vol_id)
    data.update(access_mode="rw", encrypted=False, qos_specs=None)
    del data["volume_id"]
    return {"driver_volume_type": "iscsi", "serial": vol_id, "data": data}


def grow_lun(tgt, size):
    """Cinder extended the volume: tgtd reads a file LUN's size when the LUN
    is made, so grow the file and make the LUN again."""
    os.truncate(tgt.backing, size)
    tgt._adm("--mode", "logicalunit", "--op", "delete", "--tid", "1", "--lun", "1")
    tgt._adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", tgt.backing)


def test_extend_of_a_stopped_guest_reaches_the_guest_at_its_next_start(nova_conf, node, domains):
    """Cinder extended a volume attached to a stopped instance: nova's
    extend_volume (unchanged nova code) has the sidecar re-read the size,
    and the guest's next start sees it. The capability says so."""
    from nova import context

    tgt, src, _ = node
    drv = driver_for(nova_conf, src)
    assert drv.capabilities["supports_extend_volume"] is True
    ci = connection_info(tgt)
    vol_id = ci["serial"]
    drv._connect_volume(None, ci, None, encryption={})
    try:
        conf = drv._get_volume_config(ci, {"dev": "vdb", "bus": "virtio", "type": "disk"})
        dom = domains(conf.to_xml())  # defined, not running
        size = os.path.getsize(tgt.backing)
        grow_lun(tgt, size + (16 << 20))
        drv.extend_volume(context.get_admin_context(), ci, instance_for(dom), size + (16 << 20))
        client = drv.volume_drivers["iscsi"].connector.client
        assert client.get_export(vol_id)["size"] == size + (16 << 20)
        dom.dom.create()
        assert dom.capacity("vdb") == size + (16 << 20)
        dom.remove()
    finally:
        drv._disconnect_volume(None, ci, None, encryption={})


def test_live_attach_and_detach_through_the_driver(nova_conf, node, domains):
    """LibvirtDriver.attach_volume / detach_volume, unchanged nova code,
    with our volume driver underneath and a running QEMU."""
    from nova import context, exception

    tgt, src, _ = node
    drv = driver_for(nova_conf, src)
    ci = connection_info(tgt)
    vol_id = ci["serial"]
    dom = domains()
    dom.dom.create()
    inst = instance_for(dom)
    ctx = context.get_admin_context()

    drv.attach_volume(ctx, ci, inst, "/dev/sdb", disk_bus="scsi", device_type="disk", encryption={})
    info = ci["data"]["vmthunder"]
    assert info["export_name"] == vol_id
    assert os.path.exists(info["socket"])
    for inactive in (False, True):
        disk = dom.disk("sdb", inactive)
        assert disk is not None, "libvirt did not keep the disk"
        assert disk.get("type") == "network"
        assert disk.find("source").get("protocol") == "nbd"
        assert disk.find("source").get("name") == vol_id
        assert disk.find("source/host").attrib == {"transport": "unix", "socket": info["socket"]}
        assert disk.findtext("serial") == vol_id
    # QEMU opened the export through the sidecar: it knows the LUN's size.
    assert dom.capacity("sdb") == os.path.getsize(tgt.backing)

    # An online extend is refused before anything changes: QEMU cannot grow
    # an NBD disk, and a refresh would drop its connection to the sidecar.
    size = os.path.getsize(tgt.backing)
    grow_lun(tgt, size + (8 << 20))
    with pytest.raises(exception.ExtendVolumeNotSupported):
        drv.extend_volume(ctx, ci, inst, size + (8 << 20))
    assert dom.capacity("sdb") == size
    connector = drv.volume_drivers["iscsi"].connector
    assert connector.client.get_export(vol_id)["size"] == size  # not refreshed

    # Nova finds the disk (by alias, then re-parsed by the plugin), detaches
    # it from the live domain (a SCSI disk needs no guest cooperation) and
    # the persistent config, then disconnects the volume.
    drv.detach_volume(ctx, ci, inst, "/dev/sdb", encryption={})
    assert dom.disk("sdb") is None and dom.disk("sdb", inactive=True) is None
    assert not os.path.exists(info["socket"])
    assert drv.volume_drivers["iscsi"].connector.get_volume_paths({"volume_id": vol_id}) == []
    # A second detach (nova retries after errors) finds nothing and is fine.
    drv.detach_volume(ctx, ci, inst, "/dev/sdb", encryption={})


def test_boot_migrate_and_detach(nova_conf, node, domains):
    """A domain defined with the volume at boot, its XML rewritten for a live
    migration to another node's sidecar, then the persistent detach."""
    from nova import context, objects
    from nova.virt.libvirt import migration
    from nova.virt.libvirt.guest import Guest

    from vmthunder_nova.config import NBDGuestDisk
    from vmthunder_nova.driver import find_nbd_disk

    tgt, src, dst = node
    drv = driver_for(nova_conf, src)
    ci = connection_info(tgt)
    vol_id = ci["serial"]
    disk_info = {"dev": "vdb", "bus": "virtio", "type": "disk"}

    # Boot: nova connects the volume, then builds the disk from its config.
    drv._connect_volume(None, ci, None, encryption={})
    conf = drv._get_volume_config(ci, disk_info)
    assert isinstance(conf, NBDGuestDisk)
    dom = domains(conf.to_xml())
    dom.dom.create()
    assert dom.capacity("vdb") == os.path.getsize(tgt.backing)
    found = find_nbd_disk(Guest(dom.dom), "vdb")
    assert found.source_socket == ci["data"]["vmthunder"]["socket"]
    assert found.source_name == vol_id
    # What detach_volume looks up: nova finds the disk by its alias with the
    # stock class, the plugin hands back one that can be formatted again.
    for persistent in (False, True):
        dev = drv._get_guest_disk_device(
            Guest(dom.dom), "vdb", volume_uuid=vol_id, from_persistent_config=persistent
        )
        assert isinstance(dev, NBDGuestDisk) and dev.source_socket == found.source_socket
        assert etree.fromstring(dev.to_xml()).find("source/host").get("socket") == found.source_socket

    # Live migration: the destination connected the volume through its own
    # sidecar in pre_live_migration and returned its connection_info; the
    # source rewrites the domain XML with it.
    dst_ci = copy.deepcopy(ci)
    del dst_ci["data"]["vmthunder"]
    dst_drv = driver_for(nova_conf, dst)
    dst_drv._connect_volume(None, dst_ci, None, encryption={})
    dst_socket = dst_ci["data"]["vmthunder"]["socket"]
    assert dst_socket != ci["data"]["vmthunder"]["socket"]
    bdm = objects.LibvirtLiveMigrateBDMInfo(
        serial=vol_id, bus="virtio", dev="vdb", type="disk", connection_info=dst_ci
    )
    data = objects.LibvirtLiveMigrateData(bdms=[bdm])
    new = migration._update_volume_xml(dom.xml(), data, None, drv._get_volume_config)
    host = new.find("./devices/disk/source/host")
    assert host.attrib == {"transport": "unix", "socket": dst_socket}
    assert new.find("./devices/disk/source").get("name") == vol_id
    # The destination's libvirtd must accept the rewritten XML and its QEMU
    # open the destination's export: run it as a second domain here (a live
    # domain's XML names its security labels: leave those to libvirt).
    for el in new.findall("seclabel"):
        new.remove(el)
    migrated = domains(doc=new)
    migrated.dom.create()
    assert migrated.capacity("vdb") == os.path.getsize(tgt.backing)
    migrated.remove()
    dst_drv._disconnect_volume(None, dst_ci, None, encryption={})
    assert not os.path.exists(dst_socket)

    # Detach from a stopped guest: only the persistent config changes.
    dom.dom.destroy()
    drv.detach_volume(context.get_admin_context(), ci, instance_for(dom), "/dev/vdb", encryption={})
    assert dom.disk("vdb", inactive=True) is None
    assert not os.path.exists(ci["data"]["vmthunder"]["socket"])


def test_xml_is_rebuilt_from_saved_connection_info(nova_conf, node):
    """After a restart of nova-compute the saved connection_info still names
    the export; without the record the plugin asks the sidecar again."""
    tgt, src, _ = node
    drv = driver_for(nova_conf, src)
    ci = connection_info(tgt)
    drv._connect_volume(None, ci, None, encryption={})
    saved = copy.deepcopy(ci)
    first = drv._get_volume_config(saved, {"dev": "vdc", "bus": "virtio", "type": "disk"})
    del saved["data"]["vmthunder"]
    again = drv._get_volume_config(saved, {"dev": "vdc", "bus": "virtio", "type": "disk"})
    assert again.to_xml() == first.to_xml()
    drv._disconnect_volume(None, ci, None, encryption={})
    drv._disconnect_volume(None, ci, None, encryption={})  # idempotent


BIOS_LOOP = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><bios rebootTimeout='0'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}</devices>
</domain>"""


def src_group(sidecar):
    """The NBD group the node fixture gave its sidecars (QEMU's)."""
    with open(sidecar.config) as f:
        for line in f:
            if line.startswith("nbd_group"):
                return line.split("=", 1)[1].strip()
    return "root"


def wait_until(pred, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_sidecar_restart_pauses_the_guest_and_the_driver_resumes_it(nova_conf, node, libvirt_conn):
    """libvirt 9.0 drops <reconnect delay>, so QEMU fails the requests a
    sidecar restart catches. The driver's disks stop the guest instead
    (error_policy and rerror_policy 'stop', which libvirt keeps), and the
    resumer resumes it once the sidecar serves the export again: the failed
    request is retried and the guest never sees an error. The guest is
    SeaBIOS alone, reading its boot disk, finding nothing to boot and
    rebooting at once: I/O without a guest OS."""
    import libvirt

    from vmthunder_nova import resume

    tgt, src, _ = node
    # A sidecar of this test's own, to restart.
    work = pyharness.tempdir("vmt-nova-restart-")
    group = src_group(src)
    sidecar = pyharness.Sidecar(work, socket_group=group)
    drv = driver_for(nova_conf, sidecar)
    assert isinstance(drv.resumer, resume.IOErrorResumer)
    ci = connection_info(tgt)
    vol_id = ci["serial"]
    dom = None
    try:
        drv._connect_volume(None, ci, None, encryption={})
        conf = drv._get_volume_config(ci, {"dev": "vda", "bus": "virtio", "type": "disk"})
        conf.boot_order = "1"
        uid = str(uuid.uuid4())
        dom = libvirt_conn.defineXML(
            BIOS_LOOP.format(name=f"vmt-test-{uid[:8]}", uuid=uid, disks=conf.to_xml())
        )
        dom.create()
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
            drv_el = etree.fromstring(dom.XMLDesc(flags)).find("./devices/disk/driver")
            assert drv_el.get("error_policy") == "stop" and drv_el.get("rerror_policy") == "stop"
        client = drv.volume_drivers["iscsi"].connector.client
        wait_until(lambda: client.get_export(vol_id)["stats"]["read_ops"] > 0, "the BIOS reading its disk")

        sidecar.stop()
        wait_until(
            lambda: dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR], "a pause"
        )
        assert dom.diskErrors() == {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC}
        assert drv.resumer.poll_once() == []  # the sidecar is still down
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED

        sidecar = pyharness.Sidecar(work, socket_group=group)
        wait_until(lambda: client.get_export(vol_id)["state"] == "ready", "the export re-created")
        # The first retry may find QEMU's NBD client still reconnecting
        # and pause again: the resumer looks again.
        drv.resumer.interval = 0.2
        drv.resumer.start()
        try:
            wait_until(
                lambda: client.get_export(vol_id)["stats"]["read_ops"] > 0
                and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING,
                "the guest resumed and reading again",
            )
            # It stays up and its requests keep being served (libvirt
            # keeps reporting the last disk error after a resume: not a
            # sign of a new one).
            before = client.get_export(vol_id)["stats"]["read_ops"]
            time.sleep(1.5)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert client.get_export(vol_id)["stats"]["read_ops"] > before
        finally:
            drv.resumer.stop()
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
            dom.undefine()
        drv._disconnect_volume(None, ci, None, encryption={})
        sidecar.stop()
        pyharness.rmtree(work)


def test_a_pause_that_is_not_the_sidecars_is_left_alone(nova_conf, node, domains):
    """A guest its user paused is not the resumer's to resume (nor are the
    disks of a domain without VMThunder disks its business)."""
    from vmthunder_nova import resume

    tgt, src, _ = node
    drv = driver_for(nova_conf, src)
    dom = domains()
    dom.dom.create()
    dom.dom.suspend()
    assert dom.name not in drv.resumer.poll_once()
    assert dom.dom.state()[0] == dom.libvirt.VIR_DOMAIN_PAUSED
    xml = etree.tostring(dom.xml()).decode()
    assert resume.vmthunder_disks(xml) == {}


# Image-backed root disks over templates (imagebackend.py). The whole path
# (templates in a real Cinder, Nova's services) is tests/functional; these
# are the driver's own decisions against a sidecar without [cinder].


def image_instance(image_ref, template=None):
    from nova import objects

    class Instance(objects.Instance):
        saves = 0

        def save(self, *a, **kw):
            Instance.saves += 1

    sysmeta = {"vmthunder_template_volume": template} if template else {}
    return Instance(
        uuid=str(uuid.uuid4()),
        system_metadata=sysmeta,
        flavor=objects.Flavor(extra_specs={}),
        image_ref=image_ref,
        host="localhost",
    )


def image_meta(image_id):
    from nova import objects

    return objects.ImageMeta.from_dict({"id": image_id, "disk_format": "raw", "properties": {}})


def test_without_a_template_the_root_disk_is_stock_and_the_warning_says_why(nova_conf, node, caplog):
    import logging

    from nova.virt.libvirt import imagebackend as stock_backend

    from vmthunder_nova import imagebackend

    _, src, _ = node
    drv = driver_for(nova_conf, src)
    image_id = str(uuid.uuid4())
    # Recorded from an earlier spawn (a rebuild to an image without one).
    inst = image_instance(image_id, template=str(uuid.uuid4()))
    with caplog.at_level(logging.WARNING):
        drv._choose_root_disk(inst, image_meta(image_id), None)
    assert "vmthunder_template_volume" not in inst.system_metadata
    assert inst.saves == 1
    # This sidecar has no [cinder] section: it answers 503 cinder_unconfigured.
    assert any(
        "cannot list the templates of image " + image_id in r.getMessage()
        and "cinder_unconfigured" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    disk = drv.image_backend.by_name(
        inst, "disk", disk_info_mapping={"bus": "virtio", "dev": "vda", "type": "disk"}
    )
    assert not isinstance(disk, imagebackend.TemplateRoot)
    assert isinstance(disk, stock_backend.Image)


def test_template_root_disks_and_volume_backed_instances(nova_conf, node):
    from vmthunder_nova import imagebackend

    _, src, _ = node
    drv = driver_for(nova_conf, src)
    tmpl = str(uuid.uuid4())
    inst = image_instance(str(uuid.uuid4()), template=tmpl)
    mapping = {"bus": "virtio", "dev": "vda", "type": "disk"}
    root = drv.image_backend.by_name(inst, "disk", disk_info_mapping=mapping)
    assert isinstance(root, imagebackend.TemplateRoot)
    assert root.template_volume == tmpl
    assert root.path.endswith(os.path.join(inst.uuid, "disk.vmthunder"))
    # Ephemeral, swap and config drive stay with Nova's backend.
    for name in ("disk.local", "disk.swap", "disk.config", "disk.rescue"):
        assert not isinstance(
            drv.image_backend.by_name(inst, name, disk_info_mapping=mapping), imagebackend.TemplateRoot
        )
    # A volume-backed instance never gets a template root disk.
    bdi = {
        "root_device_name": "/dev/vda",
        "block_device_mapping": [{"mount_device": "/dev/vda", "boot_index": 0}],
    }
    drv._choose_root_disk(inst, image_meta(inst.image_ref), bdi)
    assert imagebackend.template_of(inst) is None


def test_live_migration_of_a_template_root_disk_is_refused(nova_conf, node):
    from nova import exception

    from vmthunder_nova import driver as vmt_driver

    _, src, _ = node
    drv = driver_for(nova_conf, src)
    inst = image_instance(str(uuid.uuid4()), template=str(uuid.uuid4()))
    with pytest.raises(exception.MigrationPreCheckError) as e:
        drv.check_can_live_migrate_source(None, inst, None)
    assert "live migration" in str(e.value) and vmt_driver.LIVE_MIGRATION_REFUSED in str(e.value)


def test_the_store_moves_between_instance_directories_by_rename(tmp_path):
    from vmthunder_nova import imagebackend

    old, new = tmp_path / "uuid_resize", tmp_path / "uuid"
    old.mkdir()
    new.mkdir()
    for name, data in (
        ("disk.vmthunder", b"store"),
        ("disk.vmthunder.bitmap", b"bits"),
        ("disk.info", b"{}"),
    ):
        (old / name).write_bytes(data)
    inode = os.stat(old / "disk.vmthunder").st_ino
    assert imagebackend.move_store(str(old), str(new)) == ["disk.vmthunder", "disk.vmthunder.bitmap"]
    # The same file (owner, link count) under its new name; others stay.
    assert os.stat(new / "disk.vmthunder").st_ino == inode
    assert (new / "disk.vmthunder.bitmap").read_bytes() == b"bits"
    assert sorted(os.listdir(old)) == ["disk.info"]
    assert imagebackend.move_store(str(tmp_path / "missing"), str(new)) == []
