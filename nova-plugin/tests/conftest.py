import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))


@pytest.fixture(scope="session")
def libvirt_conn():
    """The system libvirtd (started here if it is not running)."""
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
        for _ in range(100):
            conn = try_open()
            if conn:
                break
            time.sleep(0.1)
    assert conn is not None, "libvirtd did not start"
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def nova_conf():
    from nova import conf, objects

    objects.register_all()
    CONF = conf.CONF
    CONF([], project="nova", default_config_files=[])
    CONF.set_override("virt_type", "qemu", group="libvirt")
    return CONF
