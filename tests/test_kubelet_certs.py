"""The kubelet's client certificate, signed before a switch to Kubernetes powers the node
(provisioner/kubelet_certs.py): kept and renewed at a third of its life; a switch asks for it
right before the power action and goes on without it (TLS bootstrap) when it cannot be had.
Against the real control plane: the CSR is created, approved by provisioner under the rights of
examples/kubernetes/provisioner-rbac.yaml and signed by kube-controller-manager, and kubectl with
the certificate is system:node:NAME; an account without the right to approve gets the fallback,
with an event that says so. The node joining with it in qemu: test_e2e_images.py."""

from __future__ import annotations

import base64
import json
import stat
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from provisioner import config, kubelet_certs
from provisioner.clusters.kubernetes import KubernetesAdapter
from provisioner.model import KubernetesSettings
from provisioner.reconcile import Reconciler
from provisioner.states import BOOTING, K8S
from provisioner.store import Store
from testbed.kube_control_plane import RBAC_EXAMPLE
from testbed.site import mac, write_site
from tests.fakes import FakeKube, FakePower, FakeSlurm, slurm_node


@pytest.fixture
def world(tmp_path):
    # Node names of its own: the control plane is the session's, and every other world's switch
    # to Kubernetes leaves its own CSRs there.
    nodes = [{"name": "sn41", "pool": "shared", "default_role": "slurm", "macs": [mac(1, 3)], "ip": "10.0.3.1",
              "bmc": {"address": "127.0.0.1"}},
             {"name": "sn42", "pool": "shared", "default_role": "slurm", "macs": [mac(2, 3)], "ip": "10.0.3.2",
              "bmc": {"address": "127.0.0.1"}}]
    site = config.load(write_site(tmp_path / "site", nodes))
    store = Store(site.store)
    store.seed((n.name, n.default_role) for n in site.nodes.values())
    yield site, store
    store.close()


def switch_to_k8s(site, store, kube) -> tuple[Reconciler, FakePower]:
    power = FakePower()
    rec = Reconciler(site, store, slurm=FakeSlurm(**{n: slurm_node(n) for n in site.nodes}), kube=kube, power=power)
    rec.change_role(["sn41"], K8S, actor="test", reason="test", now=True)
    assert store.get("sn41").phase == BOOTING, store.events(["sn41"])
    return rec, power


def kinds(store, node: str) -> list[str]:
    return [e.kind for e in store.events([node])]


# --------------------------------------------------------------------------- fast: the rules


def test_renewed_when_less_than_a_third_of_its_life_is_left():
    start = datetime(2027, 1, 1, tzinfo=timezone.utc)
    creds = kubelet_certs.Credentials("sn41", b"", b"", start, start + timedelta(days=30))
    assert not creds.needs_renewal(start + timedelta(days=19))
    assert creds.needs_renewal(start + timedelta(days=21))
    assert creds.needs_renewal(start - timedelta(minutes=1)) and creds.needs_renewal(start + timedelta(days=31))
    assert creds.valid(start + timedelta(days=29)) and not creds.valid(start + timedelta(days=30))


def test_the_key_is_made_once_owner_only_and_the_certificate_kept(world):
    site, _ = world
    kube = FakeKube()
    first = kubelet_certs.ensure(site, kube, "sn41")
    again = kubelet_certs.ensure(site, kube, "sn41")
    assert first.issued and not again.issued and first.not_after == again.not_after
    assert [c for c in kube.calls if c[0] == "sign_kubelet_csr"] == [("sign_kubelet_csr", "sn41")]
    folder = site.store.parent / "kubelet-certs"
    for p in (folder, folder / "sn41"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    for name in ("kubelet-client.key", "kubelet-client.crt"):
        assert stat.S_IMODE((folder / "sn41" / name).stat().st_mode) == 0o600
    creds = kubelet_certs.current(site, "sn41")
    assert kubelet_certs.for_overlay(site, "sn41") == creds
    assert kubelet_certs.for_overlay(site, "sn42") is None  # none kept: the node bootstraps
    # a certificate that is not for the node's key is not delivered, and is replaced at the next switch
    (folder / "sn42").mkdir()
    (folder / "sn42" / "kubelet-client.crt").write_bytes(creds.certificate)
    kubelet_certs.key(site, "sn42")
    assert kubelet_certs.for_overlay(site, "sn42") is None
    assert kubelet_certs.ensure(site, kube, "sn42").issued


def test_a_switch_to_k8s_has_it_signed_before_the_power_action(world):
    site, store = world
    kube = FakeKube()
    switch_to_k8s(site, store, kube)
    assert ("sign_kubelet_csr", "sn41") in kube.calls
    seen = kinds(store, "sn41")
    assert seen.index("kubelet-cert") < seen.index("power-intent")
    assert kubelet_certs.for_overlay(site, "sn41") is not None


def test_a_refused_csr_never_stops_the_switch(world):
    site, store = world
    kube = FakeKube()
    kube.refuse["sign_kubelet_csr"] = "Kubernetes API https://x forbids approving CertificateSigningRequest (HTTP 403)"
    _, power = switch_to_k8s(site, store, kube)
    [event] = store.events(["sn41"], kinds=["kubelet-cert-fallback"])
    assert "joins by TLS bootstrap" in event.message and "HTTP 403" in event.message
    assert kubelet_certs.for_overlay(site, "sn41") is None


def test_the_k8s_images_overlay_carries_the_kubeconfig_only_with_a_valid_certificate(tmp_path):
    """images/k8s: /var/lib/kubelet/kubeconfig (0600, secret part) with the node's certificate and
    key when provisioner holds them and kubelet_certificates is on; else no such file."""
    from provisioner.boot import overlay
    from tests.test_overlay import overlay_section, published_from_definition, write_secrets

    secrets = write_secrets(tmp_path / "secrets")
    pub = published_from_definition("k8s")

    def kubeconfig(site) -> tuple[dict, dict] | None:
        files = {e["path"]: (e, data) for e, data in overlay.render_files(site, site.nodes["sn01"], "k8s", pub)}
        assert "/etc/kubernetes/bootstrap-kubelet.conf" in files  # the fallback is always there
        found = files.get("/var/lib/kubelet/kubeconfig")
        return (found[0], yaml.safe_load(found[1])) if found else None

    site = config.load(write_site(tmp_path / "site", overlay=overlay_section(secrets)))
    assert kubeconfig(site) is None
    kubelet_certs.ensure(site, FakeKube(), "sn01")
    creds = kubelet_certs.current(site, "sn01")
    entry, cfg = kubeconfig(site)
    assert entry["mode"] == "0600" and overlay.is_secret(entry)
    user = cfg["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == creds.certificate
    assert base64.b64decode(user["client-key-data"]) == creds.key
    assert cfg["clusters"][0]["cluster"]["server"] == "https://10.0.0.1:6443"
    public = overlay.render_files(site, site.nodes["sn01"], "k8s", pub, secret=False)
    assert not any(creds.key in data for _, data in public)
    off = config.load(write_site(tmp_path / "site", overlay=overlay_section(secrets),
                                 kubernetes={"kubelet_certificates": False}))
    assert kubeconfig(off) is None


# --------------------------------------------------------------------------- the real control plane


def kubeconfig_with_certificate(kube, creds: kubelet_certs.Credentials, path):
    cfg = yaml.safe_load(kube.kubeconfig.read_text())
    cfg["users"] = [{"name": cfg["contexts"][0]["context"]["user"], "user": {
        "client-certificate-data": base64.b64encode(creds.certificate).decode(),
        "client-key-data": base64.b64encode(creds.key).decode()}}]
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.integration
def test_signed_by_the_real_signer_and_kubectl_is_the_node_with_it(world, kube, kubectl, tmp_path):
    site, store = world
    with KubernetesAdapter(KubernetesSettings(kubeconfig=str(kube.provisioner_kubeconfig), timeout_s=5)) as adapter:
        switch_to_k8s(site, store, adapter)
    [event] = store.events(["sn41"], kinds=["kubelet-cert"])
    assert "system:node:sn41 signed" in event.message
    csrs = json.loads(kubectl("get", "csr", "-o", "json").stdout)["items"]
    [csr] = [c for c in csrs if c["metadata"]["name"].startswith("provisioner-kubelet-sn41-")]
    assert csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
    assert csr["spec"]["username"] == "provisioner"  # made by provisioner's own, RBAC-limited account
    assert [(c["type"], c["reason"]) for c in csr["status"]["conditions"]] == [("Approved", "ProvisionerApproved")]
    creds = kubelet_certs.current(site, "sn41")
    assert creds.certificate == base64.b64decode(csr["status"]["certificate"])
    # kubectl with that certificate (a second client): the API server takes it as the node
    who = kubectl("--kubeconfig", str(kubeconfig_with_certificate(kube, creds, tmp_path / "node.conf")),
                  "auth", "whoami", "-o", "json")
    info = json.loads(who.stdout)["status"]["userInfo"]
    assert info["username"] == "system:node:sn41" and "system:nodes" in info["groups"]


@pytest.mark.integration
def test_without_the_right_to_approve_the_node_bootstraps_and_an_event_says_why(world, kube, kubectl, tmp_path):
    """provisioner's rules minus `approve` on the kubelet signer: the CSR is made, its approval
    refused (403); the switch powers the node anyway, which joins by TLS bootstrap."""
    site, store = world
    user = "provisioner-no-approve"
    docs = [d for d in yaml.safe_load_all(RBAC_EXAMPLE.read_text()) if d]
    role, binding = docs
    role["metadata"]["name"] = binding["metadata"]["name"] = binding["roleRef"]["name"] = user
    role["rules"] = [r for r in role["rules"] if "signers" not in r["resources"]]
    binding["subjects"][0]["name"] = user
    (tmp_path / "rbac.yaml").write_text(yaml.safe_dump_all([role, binding]))
    kubectl("apply", "-f", str(tmp_path / "rbac.yaml"))
    limited = kube.kubeconfig_for_cert(user, tmp_path / "limited.conf")
    try:
        with KubernetesAdapter(KubernetesSettings(kubeconfig=str(limited), timeout_s=5)) as adapter:
            _, power = switch_to_k8s(site, store, adapter)
    finally:
        kubectl("delete", "-f", str(tmp_path / "rbac.yaml"), "--ignore-not-found")
    [event] = store.events(["sn41"], kinds=["kubelet-cert-fallback"])
    assert "its kubelet joins by TLS bootstrap" in event.message
    assert "forbids approving CertificateSigningRequest" in event.message and "HTTP 403" in event.message
    assert "approve on signers kubernetes.io/kube-apiserver-client-kubelet" in event.message
    seen = kinds(store, "sn41")
    assert seen.index("kubelet-cert-fallback") < seen.index("power-intent")
    assert kubelet_certs.for_overlay(site, "sn41") is None  # the overlay writes no kubeconfig
    key = kubelet_certs.key(site, "sn41")
    assert key.split(b"\n")[1].decode() not in "".join(e.message + json.dumps(e.data) for e in store.events())
