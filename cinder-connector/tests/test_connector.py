"""The connector against a running sidecar with a tgtd origin, through real os-brick."""

import os
import subprocess
import sys

import pytest
from os_brick import exception
from os_brick.initiator import initiator_connector

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import pyharness  # noqa: E402

from vmthunder_brick import VMThunderConnector  # noqa: E402

CHAP = ("brickuser", "s3cret-pass")


@pytest.fixture(scope="module")
def env():
    work = pyharness.tempdir("vmt-brick-")
    tgt = pyharness.Tgtd(work, chap=CHAP)
    sidecar = pyharness.Sidecar(work)
    yield tgt, sidecar
    sidecar.stop()
    tgt.stop()
    pyharness.rmtree(work)


@pytest.fixture
def conn(env):
    _, sidecar = env
    return VMThunderConnector(socket_path=sidecar.api_socket)


def test_is_a_real_os_brick_connector(conn):
    from os_brick.initiator.connectors.base import BaseLinuxConnector
    assert isinstance(conn, BaseLinuxConnector)
    assert initiator_connector.InitiatorConnector in type(conn).__mro__


def test_connect_read_extend_disconnect(env, conn):
    tgt, _ = env
    props = tgt.connection_info("vol-1", chap=CHAP)
    info = conn.connect_volume(props)
    assert info["type"] == "nbd"
    assert info["uri"].startswith("nbd+unix:///vol-1?socket=")
    assert os.path.exists(info["socket"])
    # A client nobody here wrote reads the export: byte for byte the LUN.
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", tgt.backing, info["uri"]],
                   check=True, capture_output=True)
    assert conn.get_volume_paths(props) == [info["uri"]]
    assert conn.check_valid_device(info["uri"])
    assert info["uri"] in conn.get_all_available_volumes()
    # A retried attach returns the same export.
    assert conn.connect_volume(props)["uri"] == info["uri"]
    # Writes go through to the LUN (write-through for a Cinder volume).
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", info["uri"]],
                   check=True, capture_output=True)
    with open(tgt.backing, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    # Extend re-reads the size from the target.
    size = os.path.getsize(tgt.backing)
    assert conn.extend_volume(props) == size
    # Nova passes no device_info on detach.
    conn.disconnect_volume(props, None)
    assert not os.path.exists(info["socket"])
    assert conn.get_volume_paths(props) == []
    conn.disconnect_volume(props, None)  # idempotent


def test_bad_chap_becomes_brick_exception_with_sidecar_message(env, conn):
    tgt, _ = env
    props = tgt.connection_info("vol-badchap", chap=("brickuser", "wrong"))
    with pytest.raises(exception.BrickException) as e:
        conn.connect_volume(props)
    assert "authentication" in str(e.value)
    assert "wrong" not in str(e.value)


def test_unreachable_portal_and_missing_volume_id(env, conn):
    tgt, _ = env
    props = tgt.connection_info("vol-noportal")
    props["target_portal"] = f"127.0.0.1:{pyharness.free_port()}"
    with pytest.raises(exception.BrickException) as e:
        conn.connect_volume(props)
    assert "unreachable" in str(e.value) or "refused" in str(e.value)
    with pytest.raises(exception.BrickException):
        conn.connect_volume({"target_portal": "x"})


def test_connector_properties_name_the_initiator(env):
    _, sidecar = env
    props = VMThunderConnector.get_connector_properties("sudo", vmthunder_socket=sidecar.api_socket)
    assert props["initiator"].startswith("iqn.")
    assert props["vmthunder_socket"] == sidecar.api_socket


def test_sidecar_down_is_a_clear_error(tmp_path):
    c = VMThunderConnector(socket_path=str(tmp_path / "nope.sock"))
    with pytest.raises(exception.BrickException) as e:
        c.connect_volume({"volume_id": "v", "target_portal": "127.0.0.1:1", "target_iqn": "iqn.x",
                          "target_lun": 1})
    assert "cannot reach the sidecar" in str(e.value)
