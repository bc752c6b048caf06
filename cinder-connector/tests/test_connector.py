"""The connector through real os-brick, against a running sidecar (`vmthunder
daemon`) whose origin is a LUN served by a private tgtd."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from os_brick import exception
from os_brick.initiator import initiator_connector
from os_brick.initiator.connectors.base import BaseLinuxConnector
from oslo_config import cfg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import pyharness  # noqa: E402
from vmthunder_brick import SidecarError, VMThunderConnector  # noqa: E402
from vmthunder_brick.connector import brick_error  # noqa: E402

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


def failed_creates(sidecar, vid):
    """How many creates of vid the sidecar has refused (its log says)."""
    lines = sidecar.log_text().splitlines()
    return sum(1 for line in lines if "create export failed" in line and f"export={vid}" in line)


def sidecar_code(exc):
    """The sidecar's error code behind an os-brick exception."""
    cause = exc.__cause__
    assert isinstance(cause, SidecarError), repr(cause)
    return cause.code


def test_bad_chap_is_a_login_failure_and_not_retried(env):
    tgt, sidecar = env
    conn = VMThunderConnector(socket_path=sidecar.api_socket, device_scan_attempts=3, retry_interval=0.1)
    props = tgt.connection_info("vol-badchap", chap=("brickuser", "wrong"))
    with pytest.raises(exception.FailedISCSITargetPortalLogin) as e:
        conn.connect_volume(props)
    assert sidecar_code(e.value) == "auth_failed"
    assert "vol-badchap" in str(e.value)
    assert "wrong" not in str(e.value)  # the password stays secret
    # Retrying refused credentials only adds failed logins on the target.
    assert failed_creates(sidecar, "vol-badchap") == 1
    assert conn.get_volume_paths(props) == []


def test_an_unreachable_target_is_retried_then_a_portal_error(env):
    tgt, sidecar = env
    conn = VMThunderConnector(socket_path=sidecar.api_socket, device_scan_attempts=3, retry_interval=0.1)
    props = tgt.connection_info("vol-noportal", chap=CHAP)
    props["target_portal"] = f"127.0.0.1:{pyharness.free_port()}"
    with pytest.raises(exception.TargetPortalNotFound) as e:
        conn.connect_volume(props)
    assert sidecar_code(e.value) == "target_unreachable"
    assert props["target_portal"] in str(e.value)
    assert failed_creates(sidecar, "vol-noportal") == 3  # device_scan_attempts
    assert conn.get_volume_paths(props) == []


def test_sidecar_errors_become_os_brick_exceptions(env, conn):
    tgt, sidecar = env
    missing = (("vol-notarget", "target_iqn", tgt.iqn + "-missing"), ("vol-nolun", "target_lun", 7))
    for vid, key, value in missing:
        props = tgt.connection_info(vid, chap=CHAP)
        props[key] = value
        with pytest.raises(exception.VolumeDeviceNotFound) as e:
            conn.connect_volume(props)
        assert sidecar_code(e.value) == "no_such_target", str(e.value)
        assert vid in str(e.value)
        assert failed_creates(sidecar, vid) == 1, vid  # not retried

    with pytest.raises(exception.InvalidParameterValue) as e:
        conn.connect_volume(tgt.connection_info("bad id/", chap=CHAP))
    assert sidecar_code(e.value) == "invalid" and 'invalid id "bad id/"' in str(e.value)

    with pytest.raises(exception.VolumeDeviceNotFound) as e:
        conn.extend_volume({"volume_id": "never-attached"})
    assert sidecar_code(e.value) == "not_found" and 'no export "never-attached"' in str(e.value)

    with pytest.raises(exception.InvalidParameterValue) as e:
        conn.connect_volume({"target_portal": "x"})
    assert "volume_id" in str(e.value)


@pytest.mark.parametrize(
    "code, status, want",
    [
        ("bad_json", 400, exception.InvalidParameterValue),
        ("unknown_field", 400, exception.InvalidParameterValue),
        ("missing_field", 400, exception.InvalidParameterValue),
        ("invalid", 400, exception.InvalidParameterValue),
        ("bad_origin", 400, exception.InvalidParameterValue),
        ("forbidden", 403, exception.InvalidParameterValue),
        ("auth_failed", 502, exception.FailedISCSITargetPortalLogin),
        ("target_unreachable", 502, exception.TargetPortalNotFound),
        ("no_such_target", 502, exception.VolumeDeviceNotFound),
        ("not_found", 404, exception.VolumeDeviceNotFound),
        ("base_conflict", 409, exception.BrickException),
        ("conflict", 409, exception.BrickException),
        ("exists", 409, exception.BrickException),
        ("origin_error", 502, exception.BrickException),
        ("internal", 500, exception.BrickException),
        ("too_large", 413, exception.BrickException),
        ("sidecar_unreachable", 0, exception.BrickException),
        ("timeout", 0, exception.BrickException),
        ("", 500, exception.BrickException),
    ],
)
def test_the_code_alone_picks_the_exception(code, status, want):
    """The mapping of docs/api.md's connector table. The message plays no
    part: one that reads like another cause changes nothing."""
    messages = ("iscsi login failed: authentication", "target not found", "LUN not found", "unreachable")
    for message in messages:
        got = brick_error(SidecarError(status, code, message), "vol-x")
        assert type(got) is want, (code, message, type(got))
        assert message in str(got) and "vol-x" in str(got)


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
    (here base_conflict: a read-only export of a volume another export
    writes through) must come back with the sidecar's message, not a
    lookup of an export that was never made."""
    tgt, sidecar = env
    rw = tgt.connection_info("vol-conflict", chap=CHAP)
    conn.connect_volume(rw)
    ro = VMThunderConnector(socket_path=sidecar.api_socket, export_id="vol-conflict-ro")
    ro_props = dict(rw, access_mode="ro")
    try:
        with pytest.raises(exception.BrickException) as e:
            ro.connect_volume(ro_props)
        assert type(e.value) is exception.BrickException, repr(e.value)
        assert sidecar_code(e.value) == "base_conflict"
        assert "vol-conflict-ro" in str(e.value) and "no export" not in str(e.value)
        assert ro.get_volume_paths(ro_props) == []
        assert conn.client.get_export("vol-conflict")["state"] == "ready"  # left alone
    finally:
        conn.disconnect_volume(rw, None)


def test_extend_follows_a_file_origin_that_grows(env, conn):
    """extend_volume is the sidecar's refresh: it answers the origin's new
    size, as os-brick's extend_volume does, and the export serves it."""
    _, sidecar = env
    path = os.path.join(sidecar.origin_dir, "grow.img")
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
    conn.client.create_export({"id": "file-grow", "origin": path, "mode": "write-through"})
    props = {"volume_id": "file-grow"}
    try:
        assert conn.extend_volume(props) == 8 << 20  # unchanged
        os.truncate(path, 24 << 20)
        assert conn.extend_volume(props) == 24 << 20
        uri = conn.get_volume_paths(props)[0]
        assert f"({24 << 20} bytes)" in run("qemu-img", "info", "-f", "raw", uri)
        run("qemu-io", "-f", "raw", "-c", f"write -P 0x7c {20 << 20} 64k", "-c", "flush", uri)
        with open(path, "rb") as f:
            f.seek(20 << 20)
            assert f.read(65536) == b"\x7c" * 65536
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", path, uri)
    finally:
        conn.disconnect_volume(props, None)

    # A copy-on-write export cannot follow its origin's size: the sidecar
    # refuses, and extend fails instead of answering the old size.
    path = os.path.join(sidecar.origin_dir, "cow-base.img")
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
    conn.client.create_export({"id": "file-cow", "origin": path, "mode": "cow"})
    props = {"volume_id": "file-cow"}
    try:
        os.truncate(path, 16 << 20)
        with pytest.raises(exception.BrickException) as e:
            conn.extend_volume(props)
        assert sidecar_code(e.value) == "conflict" and "file-cow" in str(e.value)
        assert conn.client.get_export("file-cow")["size"] == 8 << 20
    finally:
        conn.client.delete_export("file-cow")


def test_a_failure_after_create_deletes_only_an_export_it_made(env, conn, monkeypatch):
    tgt, _ = env
    props = tgt.connection_info("vol-after", chap=CHAP)

    def broken(export):
        raise RuntimeError("device_info broke")

    monkeypatch.setattr(conn, "device_info", broken)
    with pytest.raises(RuntimeError):
        conn.connect_volume(props)
    assert conn.get_volume_paths(props) == []  # the export it made is gone
    monkeypatch.undo()
    info = conn.connect_volume(props)
    try:
        # A retried attach that fails must not take down the export it
        # reused: an attachment made before is still using it.
        monkeypatch.setattr(conn, "device_info", broken)
        with pytest.raises(RuntimeError):
            conn.connect_volume(props)
        assert conn.get_volume_paths(props) == [info["uri"]]
        assert os.path.exists(info["socket"])
    finally:
        conn.disconnect_volume(props, None)


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


class SlowPortal:
    """A TCP proxy in front of a tgtd portal that holds each connection for
    `delay` seconds before passing it on: a create through it stays in state
    "creating" that long (the iSCSI login waits)."""

    def __init__(self, target_portal, delay):
        host, port = target_portal.rsplit(":", 1)
        self.target, self.delay = (host, int(port)), delay
        self.ln = socket.create_server(("127.0.0.1", 0))
        self.portal = f"127.0.0.1:{self.ln.getsockname()[1]}"
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ln.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        time.sleep(self.delay)
        up = socket.create_connection(self.target)
        self.conns += [c, up]
        for a, b in ((c, up), (up, c)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.ln.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def own_tgt():
    """A LUN of the test's own: the shared one has a base cache made before
    it grew (test_a_conflict_is_not_taken_for_an_existing_export)."""
    work = pyharness.tempdir("vmt-brick-own-")
    tgt = pyharness.Tgtd(work, chap=CHAP)
    yield tgt
    tgt.stop()
    pyharness.rmtree(work)


def test_an_existing_export_in_another_mode_is_not_reused(env, conn, own_tgt):
    """A multiattach volume already attached read-only on this node: a
    read-write attach must not be handed the read-only export (nor a
    write-through one asked for as cow), but fail naming both modes."""
    _, sidecar = env
    tgt = own_tgt
    ro = tgt.connection_info("vol-multi", chap=CHAP)
    ro["access_mode"] = "ro"
    rw = tgt.connection_info("vol-multi", chap=CHAP)
    rw["access_mode"] = "rw"
    try:
        conn.connect_volume(ro)
        with pytest.raises(exception.InvalidParameterValue) as e:
            conn.connect_volume(rw)
        msg = str(e.value)
        assert "vol-multi" in msg and "readonly" in msg and "write-through" in msg, msg
        assert "read-only" in msg and "read-write" in msg, msg
        assert conn.client.get_export("vol-multi")["mode"] == "readonly"  # left as it was
        # The same attachment again is still answered by the existing export.
        assert conn.connect_volume(ro)["export_name"] == "vol-multi"
        conn.disconnect_volume(ro, None)

        conn.connect_volume(rw)
        cow = VMThunderConnector(socket_path=sidecar.api_socket, mode="cow")
        with pytest.raises(exception.InvalidParameterValue) as e:
            cow.connect_volume(rw)
        msg = str(e.value)
        assert "vol-multi" in msg and "'write-through'" in msg and "'cow'" in msg, msg
        assert conn.client.get_export("vol-multi")["mode"] == "write-through"
    finally:
        conn.disconnect_volume(rw, None)


def test_an_existing_export_of_another_target_is_not_reused(env, conn):
    """An export left on this node for another iSCSI target (the volume was
    migrated since) must not serve the new attachment the old target."""
    tgt, _ = env
    work = pyharness.tempdir("vmt-brick-other-")
    other = pyharness.Tgtd(work)
    try:
        old = other.connection_info("vol-moved")
        conn.connect_volume(old)
        new = tgt.connection_info("vol-moved", chap=CHAP)
        with pytest.raises(exception.InvalidParameterValue) as e:
            conn.connect_volume(new)
        msg = str(e.value)
        assert "vol-moved" in msg and other.iqn in msg and tgt.iqn in msg, msg
        assert CHAP[1] not in msg
        conn.disconnect_volume(old, None)
    finally:
        other.stop()
        pyharness.rmtree(work)


def _wait_creating(client, vid):
    def creating():
        try:
            return client.get_export(vid)["state"] == "creating"
        except Exception:
            return False

    pyharness.wait_for(creating, f"export {vid} in state creating", timeout=10)


def test_an_export_being_created_is_waited_for(env, conn, own_tgt):
    """Two attachments of one volume at once: the second finds the export
    the first is still making, and must wait for it to be ready instead of
    handing out a socket that does not exist yet; or fail clearly when it
    takes too long."""
    _, sidecar = env
    tgt = own_tgt
    proxy = SlowPortal(tgt.connection_info("x")["target_portal"], delay=1.5)
    props = tgt.connection_info("vol-racing", chap=CHAP)
    props["target_portal"] = proxy.portal
    first = {}
    t = threading.Thread(target=lambda: first.update(conn.connect_volume(props)))
    try:
        t.start()
        _wait_creating(conn.client, "vol-racing")
        info = conn.connect_volume(props)
        assert os.path.exists(info["socket"]), "handed out before the export was ready"
        assert conn.client.get_export("vol-racing")["state"] == "ready"
        t.join(30)
        assert first["uri"] == info["uri"]
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", tgt.backing, info["uri"])
        conn.disconnect_volume(props, None)

        # Not ready within the connector's bound: a clear error.
        proxy.delay = 4
        impatient = VMThunderConnector(socket_path=sidecar.api_socket, create_wait=0.5)
        t = threading.Thread(target=lambda: conn.connect_volume(props))
        t.start()
        _wait_creating(conn.client, "vol-racing")
        with pytest.raises(exception.BrickException) as e:
            impatient.connect_volume(props)
        assert "vol-racing" in str(e.value) and "creating" in str(e.value), str(e.value)
        t.join(30)
        assert conn.client.get_export("vol-racing")["state"] == "ready"
    finally:
        t.join(30)
        conn.disconnect_volume(props, None)
        proxy.close()


def test_a_create_that_times_out_leaves_no_export(env, own_tgt):
    """The sidecar answers a create once the export is ready. When that
    takes longer than create_timeout (here the [vmthunder] option, as
    nova.conf sets it) the attach fails, and the export the sidecar
    finishes afterwards is deleted: nothing will ever detach it."""
    _, sidecar = env
    tgt = own_tgt
    proxy = SlowPortal(tgt.connection_info("x")["target_portal"], delay=3)
    props = tgt.connection_info("vol-slow", chap=CHAP)
    props["target_portal"] = proxy.portal
    cfg.CONF.set_override("create_timeout", 1, group="vmthunder")
    try:
        c = VMThunderConnector(socket_path=sidecar.api_socket)
    finally:
        cfg.CONF.clear_override("create_timeout", group="vmthunder")
    try:
        start = time.monotonic()
        with pytest.raises(exception.BrickException) as e:
            c.connect_volume(props)
        assert sidecar_code(e.value) == "timeout", str(e.value)
        assert "vol-slow" in str(e.value) and "create_timeout" in str(e.value)
        # It waited for the create to end, then deleted what it made.
        assert time.monotonic() - start >= 2.5
        lines = sidecar.log_text().splitlines()
        assert any("export created" in x and "export=vol-slow" in x for x in lines)
        assert c.get_volume_paths(props) == []
        assert not [x for x in c.client.list_exports() if x["id"] == "vol-slow"]
    finally:
        c.disconnect_volume(props, None, ignore_errors=True)
        proxy.close()


def test_oslo_config_generator_lists_the_connector_options():
    """The real oslo-config-generator finds the connector's options through
    the installed package's oslo.config.opts entry point."""
    out = subprocess.run(
        [sys.executable, "-m", "oslo_config.generator", "--namespace", "vmthunder.brick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "[vmthunder]" in out
    expected = ["#create_wait = 5.0", "#create_timeout = 120.0"]
    expected += ["#cleanup_wait = 60.0", "#retry_interval = 1.0"]
    for line in expected:
        assert line in out.splitlines(), f"{line!r} missing from:\n{out}"
    assert "Minimum value: 1" in out  # create_timeout's bound is published too
