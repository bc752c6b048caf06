"""The devstack plugin: valid bash, and its stack phases, run with devstack's
functions replaced by recorders, configure what the sidecar and the Nova
plugin read."""

import configparser
import os
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Devstack's functions the plugin calls, recording instead of acting; sudo
# runs `tee` into the work dir and records everything else.
STUBS = r"""
log() { echo "$*" >> "$WORK/calls"; }
is_service_enabled() { [[ "$1" == vmthunder ]]; }
define_plugin() { :; }
enable_service() { :; }
install_package() { log install_package "$@"; }
pip_install() { log pip_install "$@"; }
die() { echo "die: $*" >&2; exit 1; }
iniset() { log iniset "$@"; }
make() { log make "$@"; }
sudo() {
    if [[ "$1" == tee ]]; then cat > "$WORK/$(basename "$2")"; else log sudo "$@"; fi
}
"""


@pytest.mark.parametrize("name", ["plugin.sh", "settings"])
def test_devstack_files_parse(name):
    subprocess.run(["bash", "-n", os.path.join(REPO, "devstack", name)], check=True)


def run_phase(tmp_path, *phase, env=None):
    script = (
        STUBS + f'DEST=/opt/stack; NOVA_CPU_CONF=/etc/nova/nova-cpu.conf\n'
        f'source {REPO}/devstack/settings\nVMTHUNDER_DIR={REPO}\n'
        f'source {REPO}/devstack/plugin.sh {" ".join(phase)}\n'
    )
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WORK": str(tmp_path), **(env or {})},
    )


def test_post_config_writes_the_sidecar_config_and_nova_options(tmp_path, nova_conf):
    r = run_phase(tmp_path, "stack", "post-config")
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    conf = configparser.ConfigParser()
    conf.read(tmp_path / "vmthunder.conf")
    # The keys the daemon reads (contrib/vmthunder.conf).
    assert conf["DEFAULT"]["api_socket"] == "/run/vmthunder/api.sock"
    assert conf["DEFAULT"]["nbd_socket_dir"] == "/run/vmthunder/nbd"
    # QEMU's group gets the NBD sockets only; the API is nova's (STACK_USER).
    assert conf["DEFAULT"]["nbd_group"] == "libvirt-qemu"
    assert conf["DEFAULT"]["api_group"] == "stack"
    assert "socket_group" not in conf["DEFAULT"]
    assert conf["DEFAULT"]["allowed_origin_dirs"] == ""
    assert conf["DEFAULT"]["allowed_origin_devices"] == "/dev/disk/by-path/ip-*-iscsi-*-lun-*"
    assert conf["DEFAULT"]["allowed_cow_dirs"] == "/var/lib/vmthunder/cow"
    assert conf["cache"]["dir"] == "/var/lib/vmthunder/cache"
    ini = [c.split()[1:] for c in calls if c.startswith("iniset ")]
    assert ["/etc/nova/nova-cpu.conf", "DEFAULT", "compute_driver", "vmthunder.VMThunderDriver"] in ini
    for section, opt, value in [s[1:] for s in ini if s[1] == "vmthunder"]:
        assert section == "vmthunder"
        assert opt in nova_conf.vmthunder, f"devstack sets unknown option {opt}"
        nova_conf.set_override(opt, value, group="vmthunder")  # type-checks the value
        nova_conf.clear_override(opt, group="vmthunder")
    assert {s[2] for s in ini if s[1] == "vmthunder"} == {"enabled", "api_socket", "reconnect_delay"}
    assert (
        "sudo install -m 0644 "
        + os.path.join(REPO, "contrib/systemd/vmthunder.service")
        + " /etc/systemd/system/vmthunder.service"
    ) in calls
    assert "sudo systemctl enable --now vmthunder.service" in calls
    assert os.path.exists(os.path.join(REPO, "contrib", "systemd", "vmthunder.service"))


def test_install_builds_the_sidecar_and_installs_both_packages(tmp_path):
    r = run_phase(tmp_path, "stack", "install")
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert f"make -C {REPO} build GO=go" in calls
    assert f"pip_install {REPO}/cinder-connector {REPO}/nova-plugin" in calls
    assert f"sudo install -m 0755 {REPO}/bin/vmthunder /usr/local/bin/vmthunder" in calls
    # Without a Go toolchain the plugin stops with a clear message.
    r = run_phase(tmp_path, "stack", "install", env={"VMTHUNDER_GO": "/nonexistent/go"})
    assert r.returncode != 0 and "set VMTHUNDER_GO" in r.stderr
