"""The [vmthunder] section of nova.conf."""

from oslo_config import cfg

from vmthunder_brick import connector

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
        "(libvirt <reconnect delay>); 0 disables reconnecting. libvirt "
        "older than the element (9.0 included) drops it: io_error_policy "
        "covers a restart there.",
    ),
    cfg.StrOpt(
        "io_error_policy",
        default="stop",
        choices=[
            (
                "stop",
                "pause the guest on an I/O error of a VMThunder disk (libvirt error_policy and "
                "rerror_policy 'stop'); the driver resumes it once the sidecar serves the export again",
            ),
            ("report", "QEMU's default: the guest sees the error"),
        ],
        help="What a guest sees when its VMThunder disk fails a request, e.g. "
        "while the sidecar restarts and QEMU's NBD client has no reconnect "
        "delay (libvirt 9.0 drops <reconnect>).",
    ),
    cfg.FloatOpt(
        "resume_interval",
        default=2.0,
        min=0,
        help="Seconds between looks for guests paused on an I/O error of a "
        "VMThunder disk whose export is served again (io_error_policy = stop); "
        "0 leaves them paused for an operator.",
    ),
    cfg.BoolOpt(
        "template_root_disks",
        default=True,
        help="Make the root disk of an image-backed instance a copy-on-write "
        "export over its image's VMThunder template (published with "
        "`vmthunder publish`), shared by every instance of the image on the "
        "node. An image without a template boots from Nova's image cache.",
    ),
    cfg.BoolOpt(
        "publish_missing_templates",
        default=False,
        help="Publish a template for an image that has none when an instance "
        "of it spawns. Not built yet: with it on, the driver still boots such "
        "an instance from Nova's image cache and says so in its warning.",
    ),
]


def register(conf):
    conf.register_group(vmthunder_group)
    conf.register_opts(opts, group=vmthunder_group)
    # The connector's own options (it registers them on the global CONF,
    # which is nova's; a test's private ConfigOpts needs them too).
    conf.register_opts(connector.connector_opts, group=vmthunder_group)


def list_opts():
    """Every [vmthunder] option nova-compute reads: the driver's and the
    os-brick connector's (oslo.config.opts entry point "vmthunder")."""
    return [(vmthunder_group, opts + connector.connector_opts)]
