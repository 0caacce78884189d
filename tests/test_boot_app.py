"""Boot endpoint behaviour, through Flask's test client (the real-server tests are in test_serve.py)."""

import pytest

from provisioner import config
from provisioner.boot.app import create_app
from provisioner.boot.boots import Boots
from provisioner.boot.service import BootService, OverlayArchive, Reply
from provisioner.store import Store
from provisioner.tokens import load_or_create_secret
from testbed.site import mac, write_site


@pytest.fixture
def client(site):
    app = create_app(site)
    return app.test_client()


def token(site, name):
    return Boots.for_site(site).token(name)  # what its script says now


def test_stage1_chains_by_mac(client):
    r = client.get("/boot.ipxe")
    assert r.status_code == 200 and r.text.startswith("#!ipxe")
    assert "/ipxe?mac=${netX/mac}" in r.text


@pytest.mark.parametrize("spelling", ["52:54:00:03:00:02", "52-54-00-03-00-02", "525400030002", "52:54:00:03:00:02".upper()])
def test_node_script_for_any_mac_spelling(client, spelling):
    r = client.get(f"/ipxe?mac={spelling}")
    assert r.status_code == 200
    assert "kernel --name kernel http://127.0.0.1:8080/images/slurm/vmlinuz" in r.text
    assert "provisioner.node=sn02 provisioner.role=slurm provisioner.version=1" in r.text
    assert "initrd http://127.0.0.1:8080/images/slurm/initrd.img" in r.text
    assert r.headers["Cache-Control"] == "no-store"


def test_role_change_changes_the_script(client, site):
    Store(site.store).set_role(["sn02"], "k8s", actor="t", reason="r", pin=True)
    r = client.get(f"/ipxe?mac={mac(2, 3)}")
    assert "images/k8s/vmlinuz" in r.text and "provisioner.role=k8s" in r.text


@pytest.mark.parametrize("query, words", [
    ("mac=52:54:00:99:99:99", "unknown MAC 52:54:00:99:99:99"),
    ("mac=hello", "malformed MAC"),
    ("", "no MAC given"),
    ("mac=${net0/mac}", "malformed MAC"),
])
def test_unknown_or_bad_mac_gets_a_waiting_script(client, site, query, words):
    r = client.get(f"/ipxe?{query}")
    assert r.status_code == 200
    assert r.text.startswith("#!ipxe") and words in r.text
    assert "sleep" in r.text and "chain --autofree http://127.0.0.1:8080/boot.ipxe" in r.text
    assert "${" not in r.text.split("echo provisioner:", 1)[1].split("\n")[0]  # nothing iPXE expands
    assert any(e.kind == "boot-refused" for e in Store(site.store).events())


def test_unknown_mac_flood_is_recorded_once(client, site):
    for _ in range(20):
        client.get("/ipxe?mac=52:54:00:99:99:98")
    refused = [e for e in Store(site.store).events() if e.kind == "boot-refused"]
    assert len(refused) == 1


def test_missing_image_file_gets_a_waiting_script(client, site):
    (site.image_root / "slurm" / "vmlinuz").unlink()
    r = client.get(f"/ipxe?mac={mac(1, 3)}")
    assert r.status_code == 200 and "is missing slurm/vmlinuz" in r.text and "sleep" in r.text


def test_broken_template_gets_a_waiting_script(tmp_path):
    import shutil

    from provisioner.model import DEFAULT_TEMPLATES
    from testbed.site import write_site

    templates = tmp_path / "tpl"
    shutil.copytree(DEFAULT_TEMPLATES, templates)
    (templates / "slurm.ipxe.j2").write_text("#!ipxe\nkernel {{ no_such_variable }}\n")
    site = config.load(write_site(tmp_path / "s", site={"templates": str(templates)}))
    r = create_app(site).test_client().get(f"/ipxe?mac={mac(1, 3)}")
    assert r.status_code == 200 and "template error" in r.text and "no_such_variable" in r.text


def test_callback_records_booted_role(client, site):
    r = client.post("/api/v1/nodes/sn01/booted", data={"role": "slurm", "version": "1", "token": token(site, "sn01")},
                    environ_base={"REMOTE_ADDR": "10.0.3.1"})
    assert r.status_code == 200 and r.json["booted_role"] == "slurm"
    st = Store(site.store).get("sn01")
    assert (st.booted_role, st.booted_version) == ("slurm", "1")
    # JSON body and a bearer token work too
    r = client.post("/api/v1/nodes/sn02/booted", json={"role": "k8s", "version": "2"},
                    headers={"Authorization": f"Bearer {token(site, 'sn02')}"}, environ_base={"REMOTE_ADDR": "10.0.3.2"})
    assert r.status_code == 200 and Store(site.store).get("sn02").booted_role == "k8s"


def test_the_callback_spends_the_token_and_is_rate_limited(client, site):
    """The token in the script (and in /proc/cmdline) is good for one callback; a node calling
    back again at once with a new one waits (one event per POST would flood the log)."""
    service_of(client.application).callbacks.every_s = 3600  # the limit, whatever the host's speed
    first = token(site, "sn01")
    ok = dict(data={"role": "slurm", "token": first}, environ_base={"REMOTE_ADDR": "10.0.3.1"})
    assert client.post("/api/v1/nodes/sn01/booted", **ok).status_code == 200
    replay = client.post("/api/v1/nodes/sn01/booted", **ok)
    assert replay.status_code == 403 and "spent" in replay.json["error"]
    again = token(site, "sn01")
    assert again != first
    r = client.post("/api/v1/nodes/sn01/booted", data={"role": "slurm", "token": again},
                    environ_base={"REMOTE_ADDR": "10.0.3.1"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    booted = [e for e in Store(site.store).events(["sn01"]) if e.kind == "booted"]
    assert len(booted) == 1


@pytest.mark.parametrize("node, tok_for, source, role, code", [
    ("sn01", "sn02", "10.0.3.1", "slurm", 403),  # another node's token
    ("sn01", None, "10.0.3.1", "slurm", 403),  # no token
    ("sn01", "sn01", "10.0.3.2", "slurm", 403),  # right token, wrong source address
    ("sn01", "sn01", "10.0.3.1", "windows", 400),
    ("zz99", "sn01", "10.0.3.1", "slurm", 404),
])
def test_callback_rejections(client, site, node, tok_for, source, role, code):
    data = {"role": role, "version": "1"}
    if tok_for:
        data["token"] = token(site, tok_for)
    r = client.post(f"/api/v1/nodes/{node}/booted", data=data, environ_base={"REMOTE_ADDR": source})
    assert r.status_code == code
    if node in site.nodes:
        assert Store(site.store).get(node).booted_role is None


def test_images_range_and_conditional(client):
    r = client.get("/images/slurm/vmlinuz", headers={"Range": "bytes=0-4"})
    assert r.status_code == 206 and r.data == b"slurm"
    full = client.get("/images/slurm/vmlinuz")
    assert full.status_code == 200
    again = client.get("/images/slurm/vmlinuz", headers={"If-None-Match": full.headers["ETag"]})
    assert again.status_code == 304


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["ok"] is True


def test_template_edit_shows_on_the_next_request(tmp_path):
    """The render cache must never serve a script from a template the admin has since edited."""
    import shutil
    import time

    from provisioner.model import DEFAULT_TEMPLATES
    from testbed.site import write_site

    templates = tmp_path / "tpl"
    shutil.copytree(DEFAULT_TEMPLATES, templates)
    site = config.load(write_site(tmp_path / "s", site={"templates": str(templates)}))
    client = create_app(site).test_client()
    first = client.get(f"/ipxe?mac={mac(1, 3)}").text
    assert first == client.get(f"/ipxe?mac={mac(1, 3)}").text  # cached: identical
    base = templates / "_linux.ipxe.j2"
    base.write_text(base.read_text().replace("imgfree", "imgfree\necho site-specific step"))
    later = time.time() + 2
    import os
    os.utime(base, (later, later))  # a different mtime even on coarse-grained file systems
    second = client.get(f"/ipxe?mac={mac(1, 3)}").text
    assert "echo site-specific step" in second and "echo site-specific step" not in first


# --------------------------------------------------------------------------- BootService's named results


def service_of(app):
    return app.extensions["provisioner.boot"]


def test_node_script_names_the_node_its_plan_or_why_not(site):
    service = BootService(site)
    ok = service.node_script(mac(2, 3), "10.0.3.2")
    assert (ok.node, ok.refused, ok.script.ok, ok.plan.role, ok.plan.version) == ("sn02", None, True, "slurm", "1")
    unknown = service.node_script("52:54:00:99:99:99", "10.9.9.9")
    assert (unknown.node, unknown.plan, unknown.refused) == (None, None, "unknown MAC 52:54:00:99:99:99")
    (site.image_root / "k8s" / "vmlinuz").unlink()
    Store(site.store).set_role(["sn03"], "k8s", actor="t", reason="r", pin=True)
    missing = service.node_script(mac(3, 3), None)
    assert missing.node == "sn03" and not missing.plan.ok and "is missing k8s/vmlinuz" in missing.refused
    kinds = [e.kind for e in Store(site.store).events() if e.actor == "boot-endpoint"]
    assert kinds == ["boot-refused", "boot-refused"]


def test_store_unavailable_the_node_waits_and_the_callback_gets_429_never_5xx(client, site, monkeypatch):
    from provisioner.errors import OperationError

    service = service_of(client.application)

    def busy(*args, **kwargs):
        raise OperationError("store is busy (database is locked); try again")

    monkeypatch.setattr(service.store, "desired_role", busy)
    monkeypatch.setattr(service.store, "record_booted", busy)
    r = client.get(f"/ipxe?mac={mac(1, 3)}")
    assert r.status_code == 200 and "state store unavailable" in r.text and "sleep" in r.text
    r = client.post("/api/v1/nodes/sn01/booted", data={"role": "slurm", "token": token(site, "sn01")},
                    environ_base={"REMOTE_ADDR": "10.0.3.1"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "5" and r.json["ok"] is False


def test_a_bug_in_the_service_still_answers_a_waiting_script(client, monkeypatch):
    service = service_of(client.application)
    monkeypatch.setattr(service, "node_script", lambda *a: 1 / 0)
    monkeypatch.setattr(service, "booted", lambda *a: 1 / 0)
    r = client.get(f"/ipxe?mac={mac(1, 3)}")
    assert r.status_code == 200 and "internal error in the boot endpoint" in r.text
    r = client.post("/api/v1/nodes/sn01/booted", data={"role": "slurm"})
    assert r.status_code == 400 and "see the boot server log" in r.json["error"]


@pytest.fixture
def overlay_site(tmp_path):
    """Both roles boot a hand-made built image with an overlay; the current version is v2."""
    from tests.support import fake_built_image

    folder = tmp_path / "site"
    fake_built_image(folder / "images", "tiny", ["v1", "v2"], current="v2")
    return config.load(write_site(folder, images={"slurm": {"image": "tiny"}, "k8s": {"image": "tiny"}}))


def test_overlay_served_to_its_node_only(overlay_site, tmp_path):
    import gzip

    from provisioner.boot import overlay

    site = overlay_site
    service = BootService(site)
    secret = load_or_create_secret(site.secret_file)
    ask = dict(token=overlay.token(secret, "sn01"), raw_mac=mac(1, 3), image="tiny", source="10.0.3.1")
    served = service.overlay("sn01", version=None, **ask)
    assert isinstance(served, OverlayArchive) and (served.image, served.version) == ("tiny", "v2")
    assert b"sn01 slurm v2\n" in gzip.decompress(served.data)
    older = service.overlay("sn01", version="v1", **ask)  # the version its script named
    assert older.version == "v1" and b"sn01 slurm v1\n" in gzip.decompress(older.data)

    refused = service.overlay("sn01", version=None, **{**ask, "token": overlay.token(secret, "sn02")})
    assert isinstance(refused, Reply) and refused.status == 403 and "wrong or no overlay token" in refused.body["error"]
    assert service.overlay("sn01", version=None, **{**ask, "raw_mac": mac(2, 3)}).status == 403
    assert service.overlay("sn01", version=None, **{**ask, "source": "10.0.3.9"}).status == 403
    assert service.overlay("sn01", version=None, **{**ask, "image": "other"}).status == 409
    gone = service.overlay("sn01", version="v0", **ask)
    assert gone.status == 404 and "asked for version v0, which does not exist" in gone.body["error"]
    kinds = sorted({e.kind for e in Store(site.store).events() if e.actor == "boot-endpoint"})
    assert kinds == ["overlay-refused", "overlay-served"]

    # the same through HTTP
    client = create_app(site).test_client()
    url = f"/overlay/sn01.cpio.gz?image=tiny&version=v2&token={ask['token']}&mac={mac(1, 3)}"
    r = client.get(url, environ_base={"REMOTE_ADDR": "10.0.3.1"})
    assert r.status_code == 200 and r.mimetype == "application/gzip" and r.headers["Cache-Control"] == "no-store"
    r = client.get(url, environ_base={"REMOTE_ADDR": "10.0.3.2"})
    assert r.status_code == 403 and ask["token"] not in r.text
