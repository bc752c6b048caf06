"""Resume guests that a sidecar restart paused.

libvirt 9.0 drops <reconnect delay> from NBD disks, so QEMU fails the
requests that reach a VMThunder disk while the sidecar restarts. With
io_error_policy = stop the disk's error policy is 'stop': QEMU pauses the
guest instead of failing them (libvirt state paused, reason ioerror), keeps
them, and retries them when the guest is resumed. This resumes such a guest
once every disk that failed is a VMThunder disk whose export the sidecar
reports ready at the same socket again. A guest paused for any other
reason, or by another disk's error, is left alone. Only libvirt and the
sidecar's API are asked; no data passes here.
"""

import threading
import time

import libvirt
from lxml import etree
from oslo_log import log as logging

from vmthunder_brick import SidecarError
from vmthunder_nova import config

LOG = logging.getLogger(__name__)


def vmthunder_disks(xml):
    """{target dev: (export id, socket)} of a domain's unix-socket NBD disks."""
    out = {}
    for node in etree.fromstring(xml).findall("./devices/disk"):
        target = node.find("target")
        if target is None or not config.NBDGuestDisk.is_unix_nbd(node):
            continue
        src = node.find("source")
        out[target.get("dev")] = (src.get("name"), src.find("host").get("socket"))
    return out


class IOErrorResumer:
    """poll_once: one look at the paused guests; start/stop: a thread doing
    it every interval seconds. get_connection: a libvirt connection (nova's
    Host.get_connection); client: the sidecar's SidecarClient."""

    def __init__(self, get_connection, client, interval=2.0):
        self.get_connection = get_connection
        self.client = client
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        # uuid -> (monotonic time of the next resume, wait after it): a
        # guest that pauses again at once (QEMU's NBD client still
        # reconnecting, or the export failing its requests) is resumed
        # after growing waits, up to MAX_BACKOFF, not every look.
        self._backoff = {}

    MAX_BACKOFF = 60.0

    def _served(self, export_id, socket):
        try:
            export = self.client.get_export(export_id)
        except SidecarError:
            return False  # sidecar still down, or no such export here
        return export.get("state") == "ready" and export.get("socket") == socket

    def poll_once(self):
        """Resume what can be resumed; answer the names of those resumed."""
        resumed = []
        conn = self.get_connection()
        paused = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED)
        seen = {dom.UUIDString() for dom in paused}
        for uuid in set(self._backoff) - seen:
            del self._backoff[uuid]  # running again: its next pause starts afresh
        now = time.monotonic()
        for dom in paused:
            try:
                uuid = dom.UUIDString()
                next_at, wait = self._backoff.get(uuid, (0.0, self.interval))
                if now < next_at:
                    continue
                state, reason = dom.state()
                if state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                    continue
                failed = [
                    d for d, err in dom.diskErrors().items() if err != libvirt.VIR_DOMAIN_DISK_ERROR_NONE
                ]
                ours = vmthunder_disks(dom.XMLDesc(0))
                if not failed or any(d not in ours for d in failed):
                    continue  # not (only) ours: for the operator
                if not all(self._served(*ours[d]) for d in failed):
                    continue  # not back yet
                dom.resume()
                self._backoff[uuid] = (now + wait, min(wait * 2, self.MAX_BACKOFF))
                LOG.info(
                    "vmthunder: resumed domain %s, paused by an I/O error of %s; the sidecar serves it "
                    "again (if it pauses again, next try in %gs)",
                    dom.name(),
                    ", ".join(sorted(failed)),
                    wait,
                )
                resumed.append(dom.name())
            except libvirt.libvirtError as e:
                # Gone or changed state meanwhile: the next look decides.
                LOG.debug("vmthunder: looking at a paused domain: %s", e)
        return resumed

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception:
                LOG.exception("vmthunder: looking for guests paused by a sidecar restart")

    def start(self):
        self._thread = threading.Thread(target=self._run, name="vmthunder-resume", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
