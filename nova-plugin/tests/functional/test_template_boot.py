"""Image-backed servers over VMThunder template bases, through Nova's own
services (base.py: in-process Nova API, conductor, scheduler, placement,
GlanceFixture; the real libvirtd, sidecar and Cinder).

Run as root with the venv's python (Nova's functional tests use testtools):

    .venv/bin/python -m testtools.run discover -s nova-plugin/tests/functional -t nova-plugin/tests/functional
"""

import base  # noqa: I001  (Nova's monkey patching and sys.path first)

import os
import time

import harness


class TemplateBootTest(base.NovaOnVMThunder):
    """One node: the four-server wave, then every compute path on one or
    two of them, then leftovers."""

    def test_wave_and_compute_paths(self):
        image_a = self._image("vmt-guest-a", "a")
        image_b = self._image("vmt-guest-b", "b")
        tmpl_a = self.sidecar.publish(self.guest["root"], "vmt-guest-a", image_a)
        tmpl_b = self.sidecar.publish(self.guest["root"], "vmt-guest-b", image_b)
        self.assertEqual(image_a, tmpl_a["image_id"])
        self.assertEqual(self.guest["size"], tmpl_a["size"])
        flavor = self._flavor("vmt.small", 256)
        bigger = self._flavor("vmt.medium", 320)

        # The wave: four servers of one image in one request.
        started = time.monotonic()
        created = self.api.api_post(
            "/servers",
            {
                "server": {
                    "name": "wave",
                    "imageRef": image_a,
                    "flavorRef": flavor,
                    "networks": "none",
                    "min_count": 4,
                    "max_count": 4,
                    "return_reservation_id": True,
                }
            },
        ).body
        servers = self.api.get_servers(search_opts={"reservation_id": created["reservation_id"]})
        self.assertEqual(4, len(servers))
        ids = sorted(s["id"] for s in servers)
        for sid in ids:
            self._wait_server(sid, "ACTIVE")
        for sid in ids:
            self._wait_booted(sid, "a")
        wave_seconds = time.monotonic() - started

        exports = self._exports()
        self.assertEqual({f"{sid}.disk" for sid in ids}, set(exports))
        bases = {e["base"] for e in exports.values()}
        self.assertEqual(1, len(bases), bases)
        base_a = bases.pop()
        for sid in ids:
            e = exports[f"{sid}.disk"]
            self.assertEqual("cow", e["mode"])
            self.assertEqual(tmpl_a["volume_id"], e["template_volume"])
            self.assertEqual(os.path.realpath(self._store(sid)), os.path.realpath(e["cow_path"]))
            self.assertEqual("ready", e["state"])
            # Each guest wrote its block into its own store, not the base.
            self.assertEqual(f"{self.guest['write_marker']} a", self._guest_write(sid))
            # No root disk from Nova's image cache.
            self.assertFalse(os.path.exists(os.path.join(self.instances_path, sid, "disk")))
        wave_origin = self._node_stats()["origin_bytes"]
        # Every guest read its boot's files through the one base.
        self.assertGreaterEqual(wave_origin, self.guest["boot_read_bytes"])
        self.assertEqual(1, len(harness.volume_attachments(self.cloud, tmpl_a["volume_id"])))
        self.assertEqual(4, self._base(base_a)["exports"])

        # Hard reboot: the domain is re-made over the same store.
        one, two = ids[0], ids[1]
        self.api.post_server_action(one, {"reboot": {"type": "HARD"}})
        self._wait_server(one, "ACTIVE")
        self._wait_booted(one, "a")
        self.assertIn(f"{one}.disk", self._exports())
        # The base was warm: a reboot costs the origin (nearly) nothing.
        warm_origin = self._node_stats()["origin_bytes"] - wave_origin

        # Stop and start.
        self.api.post_server_action(one, {"os-stop": None})
        self._wait_server(one, "SHUTOFF")
        self.api.post_server_action(one, {"os-start": None})
        self._wait_server(one, "ACTIVE")
        self._wait_booted(one, "a")
        self.assertEqual(f"{self.guest['write_marker']} a", self._guest_write(one))

        # Rebuild to the second image: a new store over its template, a
        # cold base of the same content: one boot's working set from the
        # origin, the yardstick for the wave's.
        before = self._node_stats()["origin_bytes"]
        self.api.post_server_action(one, {"rebuild": {"imageRef": image_b}})
        self._wait_server(one, "ACTIVE")
        self._wait_booted(one, "b")
        one_boot = self._node_stats()["origin_bytes"] - before
        print(
            f"\nwave: 4 servers ACTIVE and booted in {wave_seconds:.0f}s; origin bytes {wave_origin} = "
            f"{wave_origin / one_boot:.2f} x one cold boot's ({one_boot}; guest file reads "
            f"{self.guest['boot_read_bytes']}); a warm hard reboot: {warm_origin} origin bytes"
        )
        self.assertLess(wave_origin, 1.5 * one_boot, "the four boots did not share one base's origin reads")
        self.assertLess(warm_origin, one_boot / 4, "a reboot over a warm base went back to the origin")
        e = self._exports()[f"{one}.disk"]
        self.assertEqual(tmpl_b["volume_id"], e["template_volume"])
        self.assertNotEqual(base_a, e["base"])
        self.assertEqual(f"{self.guest['write_marker']} b", self._guest_write(one))
        self.assertEqual(1, len(harness.volume_attachments(self.cloud, tmpl_b["volume_id"])))

        # Resize on this host: the store moves with the instance directory.
        self.api.post_server_action(two, {"resize": {"flavorRef": bigger}})
        self._wait_server(two, "VERIFY_RESIZE")
        self._wait_booted(two, "a")
        e = self._exports()[f"{two}.disk"]
        self.assertEqual(os.path.realpath(self._store(two)), os.path.realpath(e["cow_path"]))
        self.assertFalse(os.path.exists(os.path.join(self.instances_path, two + "_resize", "disk.vmthunder")))
        self.api.post_server_action(two, {"confirmResize": None})
        # The API sets no task state for a confirm: it runs after the call.
        self._wait_server(two, "ACTIVE", passing=("VERIFY_RESIZE",))
        self.assertFalse(os.path.exists(os.path.join(self.instances_path, two + "_resize")))
        self.assertEqual(f"{self.guest['write_marker']} a", self._guest_write(two))
        self.assertEqual(320, self.api.get_server(two)["flavor"]["ram"])

        # Resize and revert: the store goes back with the old directory.
        three = ids[2]
        self.api.post_server_action(three, {"resize": {"flavorRef": bigger}})
        self._wait_server(three, "VERIFY_RESIZE")
        self.api.post_server_action(three, {"revertResize": None})
        self._wait_server(three, "ACTIVE")
        self._wait_booted(three, "a")
        e = self._exports()[f"{three}.disk"]
        self.assertEqual(os.path.realpath(self._store(three)), os.path.realpath(e["cow_path"]))
        self.assertFalse(os.path.exists(os.path.join(self.instances_path, three + "_resize")))
        self.assertEqual(f"{self.guest['write_marker']} a", self._guest_write(three))
        self.assertEqual(256, self.api.get_server(three)["flavor"]["ram"])

        # An image without a template boots the stock way (Nova's image
        # cache, a qcow2 root disk), and the warning says why.
        self.flags(publish_missing_templates=True, group="vmthunder")
        plain = self._image("vmt-guest-plain", "plain")
        stock = self.api.post_server(
            {"server": {"name": "stock", "imageRef": plain, "flavorRef": flavor, "networks": "none"}}
        )["id"]
        self._wait_server(stock, "ACTIVE")
        self.assertNotIn(f"{stock}.disk", self._exports())
        self.assertTrue(os.path.exists(os.path.join(self.instances_path, stock, "disk")))
        with open(os.path.join(self.work, "nova.log")) as f:
            self.assertIn(
                f"image {plain} has no VMThunder template and publishing one on demand "
                "([vmthunder] publish_missing_templates) is not built yet",
                f.read(),
            )
        ids.append(stock)

        # Delete everything: exports, sockets, stores and attachments go;
        # the template bases' caches stay for the next server.
        for sid in ids:
            self.api.delete_server(sid)
        for sid in ids:
            self._wait_until_deleted({"id": sid})
        self.assertEqual({}, self._exports())
        self.assertEqual([], self.sidecar.sockets())
        left = [
            os.path.join(root, n)
            for root, _, names in os.walk(self.instances_path)
            for n in names
            if "vmthunder" in n
        ]
        self.assertEqual([], left)
        for tmpl in (tmpl_a, tmpl_b):
            harness.wait_for(
                lambda t=tmpl: not harness.volume_attachments(self.cloud, t["volume_id"]),
                f"no Cinder attachment of template {tmpl['volume_id']}",
                timeout=60,
            )
        kept = self._base(base_a)
        self.assertIsNotNone(kept, "the template base's cache was removed with its last export")
        self.assertGreaterEqual(kept["present_bytes"], self.guest["boot_read_bytes"])
