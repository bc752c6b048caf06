"""`make demo --openstack`: the main job through OpenStack's compute API.

The Nova functional harness (nova-plugin/tests/functional/base.py: Nova's
own in-process API, conductor, scheduler and placement, with the VMThunder
driver on the real libvirtd, the real sidecar and a real Cinder) boots N
servers (default 4; -n or VMTHUNDER_DEMO_VMS) of one image in one request,
twice in the same run:

  - baseline: the image has no template, so Nova boots it the stock way,
    from its image cache (the whole image downloaded from the image
    service into _base once, a qcow2 overlay per server);
  - vmthunder: the image is published as a template in Cinder, and every
    root disk is a copy-on-write export over its one shared base.

It prints a table per server and writes demo-report.json. Run as root with
the venv's python (tests/demo.sh --openstack does). Not named openstack.py: its directory is
sys.path[0], and Nova imports the openstack SDK.
"""

import argparse
import json
import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "nova-plugin", "tests", "functional"))

import base  # noqa: E402, I001  (Nova's monkey patching and sys.path first)
import harness  # noqa: E402
from nova.virt.libvirt import imagecache  # noqa: E402

VMS = int(os.environ.get("VMTHUNDER_DEMO_VMS", "4"))
REPORT = os.environ.get("VMTHUNDER_DEMO_REPORT", os.path.join(REPO, "demo-report.json"))
STARTED = time.monotonic()


def say(msg):
    print(f"[{time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


def mib(n):
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


class Demo(base.NovaOnVMThunder):
    def _wave(self, image_id, flavor, name, nonce):
        """N servers of image_id in one request; per server the seconds
        from the request to the guest's boot marker."""
        t0 = time.monotonic()
        created = self.api.api_post(
            "/servers",
            {
                "server": {
                    "name": name,
                    "imageRef": image_id,
                    "flavorRef": flavor,
                    "networks": "none",
                    "min_count": VMS,
                    "max_count": VMS,
                    "return_reservation_id": True,
                }
            },
        ).body
        servers = self.api.get_servers(search_opts={"reservation_id": created["reservation_id"]})
        ids = sorted(s["id"] for s in servers)
        booted = {}
        want = f"{self.guest['marker']} nonce={nonce}"

        def all_booted():
            for sid in ids:
                if sid not in booted and want in harness.console_log(self.instances_path, sid):
                    booted[sid] = time.monotonic() - t0
                    say(f"{name}: {sid} booted after {booted[sid]:.1f}s")
            return len(booted) == len(ids)

        harness.wait_for(all_booted, f"{VMS} {name} guests to boot", timeout=base.BOOT_TIMEOUT * 2)
        for sid in ids:
            self._wait_server(sid, "ACTIVE")
        return ids, booted

    def _delete(self, ids):
        for sid in ids:
            self.api.delete_server(sid)
        for sid in ids:
            self._wait_until_deleted({"id": sid})

    def test_demo(self):
        flavor = self._flavor("vmt.demo", 256)
        report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "via": "openstack compute API (Nova functional services, VMThunder driver)",
            "vms": VMS,
            "image_bytes": self.guest["size"],
            "boot_read_bytes": self.guest["boot_read_bytes"],
        }

        # Baseline: stock Nova, the image's bytes from the image service.
        stock = self._image("vmt-demo-stock", "stock", data=self.guest["root"])
        say(f"baseline: {VMS} servers of an image without a template (Nova's image cache)")
        ids, booted = self._wave(stock, flavor, "stock", "stock")
        report["baseline"] = [
            {
                "name": sid,
                "path": "baseline-nova-image-cache",
                "boot_seconds": booted[sid],
                "guest_read_bytes": self.guest["boot_read_bytes"],
            }
            for sid in ids
        ]
        # What Nova's image cache fetched from the image service for the
        # node: the image's file in _base.
        cached = os.path.join(self.instances_path, "_base", imagecache.get_cache_fname(stock))
        report["baseline_target_bytes"] = os.path.getsize(cached)
        self._delete(ids)

        image = self._image("vmt-demo", "demo")
        tmpl = self.sidecar.publish(self.guest["root"], "vmt-demo", image)
        report["chunk_size"] = tmpl.get("chunk_size")
        say(f"vmthunder: published template {tmpl['volume_id']}; {VMS} servers of its image")
        origin0 = self._node_stats()["origin_bytes"]
        ids, booted = self._wave(image, flavor, "vmthunder", "demo")
        exports = self._exports()
        ours = []
        for sid in ids:
            st = exports[f"{sid}.disk"].get("stats", {})
            ours.append(
                {
                    "name": sid,
                    "path": "vmthunder-nova",
                    "boot_seconds": booted[sid],
                    "guest_read_bytes": self.guest["boot_read_bytes"],
                    "origin_bytes": st.get("origin_bytes"),
                    "cache_bytes": st.get("cache_hit_bytes"),
                    "export_read_bytes": st.get("read_bytes"),
                    "export_write_bytes": st.get("write_bytes"),
                }
            )
        report["vmthunder"] = ours
        report["vmthunder_target_bytes"] = self._node_stats()["origin_bytes"] - origin0
        report["mean_boot_seconds_baseline"] = sum(v["boot_seconds"] for v in report["baseline"]) / VMS
        report["mean_boot_seconds_vmthunder"] = sum(v["boot_seconds"] for v in ours) / VMS
        report["vmthunder_over_baseline"] = report["vmthunder_target_bytes"] / report["baseline_target_bytes"]
        report["vmthunder_over_boot_reads"] = report["vmthunder_target_bytes"] / self.guest["boot_read_bytes"]
        self._delete(ids)

        with open(REPORT, "w") as f:
            json.dump(report, f, indent=2)
        print()
        print(f"{VMS} servers per path through the compute API; from origin: the bytes the sidecar read")
        print("from the template's iSCSI LUN for that server's export; from cache: its cache_hit_bytes")
        print()
        print(f"{'server':38} {'path':26} {'boot s':>7} {'from origin':>14} {'from cache':>14}")
        for v in report["baseline"] + ours:
            print(
                f"{v['name']:38} {v['path']:26} {v['boot_seconds']:7.1f} "
                f"{mib(v.get('origin_bytes')):>14} {mib(v.get('cache_bytes')):>14}"
            )
        print()
        print(
            f"image {mib(self.guest['size'])}; one boot reads {mib(self.guest['boot_read_bytes'])} of files. "
            f"From the storage side, {VMS} servers: baseline {mib(report['baseline_target_bytes'])} "
            f"(the whole image into Nova's cache), vmthunder {mib(report['vmthunder_target_bytes'])} "
            f"({report['vmthunder_over_boot_reads']:.2f}x the boot's file reads)"
        )
        print(
            f"mean boot: baseline {report['mean_boot_seconds_baseline']:.1f} s, "
            f"vmthunder {report['mean_boot_seconds_vmthunder']:.1f} s; report: {REPORT}"
        )


def main():
    global VMS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=VMS, help="servers per path")
    args = p.parse_args()
    VMS = args.n
    result = unittest.TextTestRunner(verbosity=1).run(unittest.defaultTestLoader.loadTestsFromTestCase(Demo))
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
