"""The [vmthunder] section of nova.conf."""

from oslo_config import cfg

vmthunder_group = cfg.OptGroup("vmthunder", title="VMThunder sidecar options")

opts = [
    cfg.BoolOpt(
        "enabled", default=True, help="Route iSCSI volume attachments through the VMThunder sidecar."
    ),
    cfg.StrOpt("api_socket", default="/run/vmthunder/api.sock", help="The sidecar's API unix socket."),
    cfg.IntOpt(
        "reconnect_delay",
        default=5,
        min=0,
        help="Seconds QEMU waits before reconnecting to a restarted sidecar "
        "(libvirt <reconnect delay>); 0 disables reconnecting.",
    ),
]


def register(conf):
    conf.register_group(vmthunder_group)
    conf.register_opts(opts, group=vmthunder_group)
