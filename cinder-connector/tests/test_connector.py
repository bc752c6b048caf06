"""The connector through real os-brick, against a running sidecar (`vmthunder
daemon`) whose origin is a LUN served by a private tgtd."""

import os
import subprocess
import sys

import pytest
from os_brick import exception
from os_brick.initiator import initiator_connector
from os_brick.initiator.connectors.base import BaseLinuxConnector

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


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def grow_lun(tgt, size):
    """Extend the Cinder volume: tgtd reads a file LUN's size when the LUN
    is made, so grow the file and make the LUN again."""
    os.truncate(tgt.backing, size)
    tgt._adm("--mode", "logicalunit", "--op", "delete", "--tid", "1", "--lun", "1")
    tgt._adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", tgt.backing)


def test_is_a_real_os_brick_connector(conn):
    import vmthunder_brick

    # The pip-installed package is under test, not the source tree.
    assert "site-packages" in vmthunder_brick.__file__
    assert isinstance(conn, BaseLinuxConnector)
    assert initiator_connector.InitiatorConnector in type(conn).__mro__
    assert conn.get_search_path() is None


def test_connect_read_write_extend_disconnect(env, conn):
    tgt, _ = env
    props = tgt.connection_info("vol-1", chap=CHAP)
    info = conn.connect_volume(props)
    assert info["type"] == "nbd"
    assert info["export_name"] == "vol-1"
    assert info["path"] == info["uri"] == f"nbd+unix:///vol-1?socket={info['socket']}"
    assert os.path.exists(info["socket"])
    # A client nobody here wrote reads the export: byte for byte the LUN.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", tgt.backing, info["uri"])
    assert conn.get_volume_paths(props) == [info["uri"]]
    assert conn.check_valid_device(info["uri"])
    assert not conn.check_valid_device(info["uri"] + "x")
    assert info["uri"] in conn.get_all_available_volumes()
    # A retried attach answers the same export.
    assert conn.connect_volume(props)["uri"] == info["uri"]
    # Write-through (a Cinder volume): a flushed write is on the LUN.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", info["uri"])
    with open(tgt.backing, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    # Unchanged volume: extend answers the same size.
    size = os.path.getsize(tgt.backing)
    assert conn.extend_volume(props) == size
    # Cinder extended the volume: extend answers the new size and the export
    # serves it, the new end included.
    grow_lun(tgt, size + (16 << 20))
    assert conn.extend_volume(props) == size + (16 << 20)
    assert f"({size + (16 << 20)} bytes)" in run("qemu-img", "info", "-f", "raw", info["uri"])
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x6b {size + (8 << 20)} 64k", "-c", "flush", info["uri"])
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", tgt.backing, info["uri"])
    # Nova passes no device_info on detach.
    conn.disconnect_volume(props, None)
    assert not os.path.exists(info["socket"])
    assert conn.get_volume_paths(props) == []
    assert info["uri"] not in conn.get_all_available_volumes()
    conn.disconnect_volume(props, None)  # idempotent


def test_readonly_attachment_and_fixed_export_id(env):
    tgt, sidecar = env
    c = VMThunderConnector(socket_path=sidecar.api_socket, export_id="fixed-id")
    props = tgt.connection_info("vol-ro", chap=CHAP)
    props["access_mode"] = "ro"
    info = c.connect_volume(props)
    assert info["export_name"] == "fixed-id"
    assert c.client.get_export("fixed-id")["mode"] == "readonly"
    r = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 4k", info["uri"]], capture_output=True, text=True, timeout=60
    )
    assert "wrote" not in r.stdout, r.stdout
    c.disconnect_volume({}, None)
    assert not os.path.exists(info["socket"])


def test_socket_from_environment(env, monkeypatch):
    _, sidecar = env
    monkeypatch.setenv("VMTHUNDER_SOCKET", sidecar.api_socket)
    c = VMThunderConnector()
    assert c.client.socket_path == sidecar.api_socket
    explicit = VMThunderConnector(socket_path=sidecar.api_socket)
    assert c.get_all_available_volumes() == explicit.get_all_available_volumes()


def test_bad_chap_is_a_login_failure_with_the_sidecar_message(env, conn):
    tgt, _ = env
    props = tgt.connection_info("vol-badchap", chap=("brickuser", "wrong"))
    with pytest.raises(exception.FailedISCSITargetPortalLogin) as e:
        conn.connect_volume(props)
    assert "authentication" in str(e.value)
    assert "wrong" not in str(e.value)  # the password stays secret
    assert conn.get_volume_paths(props) == []


def test_sidecar_errors_become_os_brick_exceptions(env, conn):
    tgt, _ = env
    props = tgt.connection_info("vol-noportal", chap=CHAP)
    props["target_portal"] = f"127.0.0.1:{pyharness.free_port()}"
    with pytest.raises(exception.TargetPortalNotFound) as e:
        conn.connect_volume(props)
    assert "unreachable" in str(e.value) and props["target_portal"] in str(e.value)

    props = tgt.connection_info("vol-notarget", chap=CHAP)
    props["target_iqn"] += "-missing"
    with pytest.raises(exception.TargetPortalNotFound) as e:
        conn.connect_volume(props)
    assert "target not found" in str(e.value)

    props = tgt.connection_info("vol-nolun", chap=CHAP)
    props["target_lun"] = 7
    with pytest.raises(exception.VolumeDeviceNotFound) as e:
        conn.connect_volume(props)
    assert "LUN not found" in str(e.value)

    with pytest.raises(exception.InvalidParameterValue) as e:
        conn.connect_volume(tgt.connection_info("bad id/", chap=CHAP))
    assert 'invalid id "bad id/"' in str(e.value)

    with pytest.raises(exception.VolumeDeviceNotFound) as e:
        conn.extend_volume({"volume_id": "never-attached"})
    assert 'no export "never-attached"' in str(e.value)

    with pytest.raises(exception.InvalidParameterValue) as e:
        conn.connect_volume({"target_portal": "x"})
    assert "volume_id" in str(e.value)


def test_connector_properties_name_the_initiator(env):
    _, sidecar = env
    props = VMThunderConnector.get_connector_properties("sudo", vmthunder_socket=sidecar.api_socket)
    info = VMThunderConnector(socket_path=sidecar.api_socket).client.info()
    assert props["initiator"] == info["initiator"] and props["initiator"].startswith("iqn.")
    assert props["vmthunder_socket"] == sidecar.api_socket
    assert props["vmthunder_host"] == info["host"]


def test_sidecar_down_is_a_clear_error(tmp_path):
    c = VMThunderConnector(socket_path=str(tmp_path / "nope.sock"))
    with pytest.raises(exception.BrickException) as e:
        c.connect_volume(
            {"volume_id": "v", "target_portal": "127.0.0.1:1", "target_iqn": "iqn.x", "target_lun": 1}
        )
    assert "cannot reach the sidecar" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(exception.BrickException):
        c.disconnect_volume({"volume_id": "v"}, None)
    c.disconnect_volume({"volume_id": "v"}, None, ignore_errors=True)
    assert not c.check_valid_device("nbd+unix:///v")


def test_a_conflict_is_not_taken_for_an_existing_export(env, conn):
    """Only 409 "exists" means the export is already there: another 409
    (here the base cache kept from an attach before Cinder extended the
    volume) must come back with the sidecar's message, not a lookup of an
    export that was never made."""
    tgt, _ = env
    props = tgt.connection_info("vol-conflict", chap=CHAP)
    conn.connect_volume(props)
    conn.disconnect_volume(props, None)
    grow_lun(tgt, os.path.getsize(tgt.backing) + (16 << 20))
    with pytest.raises(exception.BrickException) as e:
        conn.connect_volume(props)
    assert not isinstance(e.value, exception.VolumeDeviceNotFound), str(e.value)
    assert "made for a base of" in str(e.value) and "no export" not in str(e.value)
    assert conn.get_volume_paths(props) == []


def test_an_export_the_sidecar_could_not_recreate_is_not_handed_out():
    """After a sidecar restart an export whose target is down is in state
    "error" (size 0, no NBD server): a connect that finds it must fail with
    the sidecar's reason, not hand QEMU a socket nothing serves."""
    work = pyharness.tempdir("vmt-brick-err-")
    tgt = pyharness.Tgtd(work)
    sidecar = pyharness.Sidecar(work)
    try:
        c = VMThunderConnector(socket_path=sidecar.api_socket)
        props = tgt.connection_info("vol-down")
        c.connect_volume(props)
        sidecar.stop()
        tgt.stop()
        if os.path.exists(sidecar.api_socket):
            os.remove(sidecar.api_socket)
        sidecar = pyharness.Sidecar(work)
        export = c.client.get_export("vol-down")
        assert export["state"] == "error" and not os.path.exists(export["socket"]), export
        with pytest.raises(exception.BrickException) as e:
            c.connect_volume(props)
        assert export["error"] in str(e.value)
        c.disconnect_volume(props, None)
        assert c.get_volume_paths(props) == []
    finally:
        sidecar.stop()
        tgt.stop()  # a no-op when already stopped
        pyharness.rmtree(work)
