import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

import pyharness  # noqa: E402


@pytest.fixture(scope="session")
def libvirt_conn():
    """The system libvirtd (started here if it is not running). Tests use
    unique domain names and remove their domains."""
    import libvirt

    def try_open():
        try:
            return libvirt.open("qemu:///system")
        except libvirt.libvirtError:
            return None

    conn = try_open()
    if conn is None:
        subprocess.run(["virtlogd", "-d"], check=False)
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + 15
        while conn is None and time.monotonic() < deadline:
            time.sleep(0.1)
            conn = try_open()
    assert conn is not None, "libvirtd did not start"
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def nova_conf():
    """nova's CONF, parsed once, with the plugin's options registered the
    way nova-compute gets them: by importing the driver package."""
    import nova.virt.vmthunder  # noqa: F401
    from nova import conf, objects

    objects.register_all()
    CONF = conf.CONF
    CONF([], project="nova", default_config_files=[])
    CONF.set_override("virt_type", "qemu", group="libvirt")
    # No libvirt event loop runs in the tests, so a live detach learns of its
    # end by polling after this timeout instead of by the event.
    CONF.set_override("device_detach_timeout", 1, group="libvirt")
    CONF.set_override("device_detach_attempts", 3, group="libvirt")
    return CONF


@pytest.fixture(scope="module")
def node():
    """A tgtd origin and two sidecars (this node and a migration
    destination), QEMU's group on the sockets so libvirt's QEMU can open them."""
    import grp

    work = pyharness.tempdir("vmt-nova-")
    group = "libvirt-qemu"
    try:
        grp.getgrnam(group)
    except KeyError:
        group = "root"
    for d in ("src", "dst"):
        os.mkdir(os.path.join(work, d), 0o755)
    tgt = pyharness.Tgtd(work)
    src = pyharness.Sidecar(os.path.join(work, "src"), socket_group=group)
    dst = pyharness.Sidecar(os.path.join(work, "dst"), socket_group=group)
    yield tgt, src, dst
    dst.stop()
    src.stop()
    tgt.stop()
    pyharness.rmtree(work)
