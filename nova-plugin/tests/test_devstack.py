"""The devstack plugin is valid bash and configures what the driver reads."""

import os
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("name", ["plugin.sh", "settings"])
def test_devstack_files_parse(name):
    subprocess.run(["bash", "-n", os.path.join(REPO, "devstack", name)], check=True)


def test_devstack_sets_the_options_the_plugin_registers(nova_conf):
    text = open(os.path.join(REPO, "devstack", "plugin.sh")).read()
    assert "compute_driver vmthunder.VMThunderDriver" in text
    for opt in ("enabled", "api_socket", "reconnect_delay"):
        assert f"iniset \"$NOVA_CONF\" vmthunder {opt}" in text
        assert opt in nova_conf.vmthunder
    assert os.path.exists(os.path.join(REPO, "contrib", "systemd", "vmthunder.service"))
