"""provisioner/boot/prerender.py without nginx: the files are the endpoint's bytes, and a poll
after a change rewrites exactly what the change affects."""

import shutil

import pytest

from provisioner import config
from provisioner.boot.app import create_app
from provisioner.boot.prerender import Watcher
from provisioner.model import DEFAULT_TEMPLATES
from provisioner.store import Store
from testbed.site import mac, write_site


@pytest.fixture
def world(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(DEFAULT_TEMPLATES, templates)
    site = config.load(write_site(tmp_path / "site", site={"templates": str(templates)}))
    client = create_app(site).test_client()
    watcher = Watcher(site, tmp_path / "scripts")
    return site, client, watcher, tmp_path / "scripts", templates


def files(folder):
    return {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}


def test_one_file_per_mac_with_the_apps_bytes(world):
    site, client, watcher, folder, _ = world
    stats = watcher.sync()
    macs = [m for n in site.nodes.values() for m in n.macs]
    assert stats["scripts"] == len(macs) and set(files(folder)) == {m + ".ipxe" for m in macs}
    for m in macs:
        assert (folder / f"{m}.ipxe").read_text() == client.get(f"/ipxe?mac={m}").get_data(as_text=True)
    watcher.sync()  # once more: the first pass named the boot files, which are watched from now on
    assert watcher.sync() is None  # nothing changed: no pass


def test_role_change_rewrites_that_node_only_and_events_cause_no_pass(world):
    site, client, watcher, folder, _ = world
    watcher.sync()
    watcher.sync()
    store = Store(site.store)
    store.add_event("sn01", "test", "note", "an event is no change")
    store.record_booted("sn02", "slurm", "1", actor="test", source=None)
    assert watcher.sync() is None
    store.set_role(["sn01"], "k8s", actor="test", reason="test", pin=True)
    stats = watcher.sync()
    assert stats == {"scripts": stats["scripts"], "written": 1, "removed": 0, "nodes": 1, "full": False}
    text = (folder / f"{mac(1, 3)}.ipxe").read_text()
    assert "images/k8s/vmlinuz" in text and text == client.get(f"/ipxe?mac={mac(1, 3)}").get_data(as_text=True)


def test_template_edit_and_missing_files(world):
    site, client, watcher, folder, templates = world
    watcher.sync()
    base = templates / "_linux.ipxe.j2"
    base.write_text(base.read_text() + "# edited\n")
    stats = watcher.sync()
    assert stats["full"] and stats["written"] == stats["scripts"]
    assert all("# edited" in t for t in files(folder).values())
    # A node whose image files are gone has no file: nginx passes it to the app, which says why.
    (site.image_root / "slurm" / "vmlinuz").unlink()
    watcher.sync()
    assert f"{mac(1, 3)}.ipxe" not in files(folder)
    assert "missing" in client.get(f"/ipxe?mac={mac(1, 3)}").get_data(as_text=True)


def test_store_unreadable_removes_every_file(world, monkeypatch):
    from provisioner.errors import OperationError

    _, _, watcher, folder, _ = world
    watcher.sync()
    assert files(folder)

    def broken():
        raise OperationError("store gone")

    monkeypatch.setattr(watcher, "store_state", broken)
    watcher.sync()
    assert files(folder) == {}


def test_stale_files_of_an_earlier_run_are_removed(world):
    _, _, watcher, folder, _ = world
    folder.mkdir()
    (folder / "52:54:00:99:99:99.ipxe").write_text("old")
    watcher.sync()
    assert "52:54:00:99:99:99.ipxe" not in files(folder)


def test_cli_prerender_and_nginx_config(world, capsys):
    from provisioner.cli import main

    site, _, _, _, _ = world
    config_path = site.templates.parent / "site" / "site.yaml"
    out = site.templates.parent / "cli-scripts"
    assert main(["--config", str(config_path), "prerender", str(out)]) == 0
    assert "6 scripts" in capsys.readouterr().out and len(files(out)) == 6
    assert main(["--config", str(config_path), "nginx-config", "--scripts", str(out), "--upstream",
                 "127.0.0.1:8081", "--listen", "8080"]) == 0
    conf = capsys.readouterr().out
    assert f'root "{out.resolve()}";' in conf and f'alias "{site.image_root.resolve()}/";' in conf
    assert "server 127.0.0.1:8081;" in conf and "listen 8080;" in conf
    # the access log has paths, never query strings (overlay and boot URLs carry tokens)
    assert 'access_log "/var/log/nginx/provisioner-boot.log" provisioner_boot;' in conf
    assert "$request_uri" not in conf and "$args" not in conf.split("log_format")[1].split(";")[0]
    assert "proxy_set_header X-Provisioner-Source-Port $remote_port;" in conf


@pytest.mark.parametrize("args, wrong", [
    (["--listen", "80; include /etc/shadow"], "--listen"),
    (["--upstream", "127.0.0.1:8081;}"], "--upstream"),
    (["--listen", "70000"], "--listen"),
    (["--scripts", '/tmp/a"b'], "--scripts"),
    (["--scripts", "/tmp/$host"], "--scripts"),
    (["--access-log", "/tmp/x\nserver {"], "--access-log"),
])
def test_nginx_config_refuses_what_nginx_would_read_otherwise(world, capsys, args, wrong):
    from provisioner.cli import main

    site, _, _, _, _ = world
    config_path = site.templates.parent / "site" / "site.yaml"
    base = {"--scripts": "/tmp/scripts", "--upstream": "127.0.0.1:8081", "--listen": "8080"}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["--config", str(config_path), "nginx-config", *(x for kv in base.items() for x in kv)]) == 2
    err = capsys.readouterr().err
    assert wrong in err


def test_image_pins_and_publishes_reach_the_files(tmp_path):
    """A built image: unpinning a node rewrites its file; publishing another version (the
    `current` link) rewrites every node that follows it; each file stays the app's bytes."""
    import os

    from tests.support import fake_built_image

    old, new = "20250101-000000", "20250202-000000"
    folder = tmp_path / "site"
    fake_built_image(folder / "images", "tiny", [old, new], current=new)
    nodes = [{"name": f"sn0{i}", "pool": "shared", "default_role": "slurm", "macs": [mac(i, 3)],
              "bmc": {"address": "127.0.0.1"}} for i in (1, 2)]
    site = config.load(write_site(folder, nodes=nodes, images={"slurm": {"image": "tiny"}, "k8s": {"image": "tiny"}}))
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    store.pin_image(["sn02"], "tiny", old, actor="test", reason="rollback")
    client = create_app(site).test_client()
    watcher = Watcher(site, tmp_path / "scripts")
    watcher.sync()
    watcher.sync()

    def same():
        for i in (1, 2):
            text = (tmp_path / "scripts" / f"{mac(i, 3)}.ipxe").read_text()
            assert text == client.get(f"/ipxe?mac={mac(i, 3)}").get_data(as_text=True)
        return [(tmp_path / "scripts" / f"{mac(i, 3)}.ipxe").read_text() for i in (1, 2)]

    first, second = same()
    assert f"tiny/{new}/vmlinuz" in first and f"tiny/{old}/vmlinuz" in second
    store.unpin_image(["sn02"], "tiny", actor="test", reason="done")
    assert watcher.sync()["nodes"] == 1
    assert f"tiny/{new}/vmlinuz" in same()[1]
    link = folder / "images" / "tiny" / "current"
    os.symlink(old, str(link) + ".new")
    os.replace(str(link) + ".new", link)
    assert watcher.sync()["full"]
    assert all(f"tiny/{old}/vmlinuz" in t for t in same())


def test_clear_removes_every_script(world):
    _, _, watcher, folder, _ = world
    watcher.sync()
    assert watcher.clear() == 6 and files(folder) == {}
