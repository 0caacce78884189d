"""A node of the k8s image joins by itself: its kubelet authenticates with the bootstrap token the
overlay carries, asks for a client certificate, kube-controller-manager approves and signs it,
and from then on the node is `system:node:NAME`. Here the kubelet's requests are made by hand
against the real control plane (the VM tests run the real kubelet), so each right the example
RBAC (examples/kubernetes/node-bootstrap-rbac.yaml) grants, and withholds, is checked."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.kube_api import Api, ApiError, ns_path

pytestmark = pytest.mark.integration

NODE = "vm-join-test"


def _csr(key) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{NODE}")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode()


def _get_as_cert(kube, path: str, cert, key) -> int:
    ctx = ssl.create_default_context(cafile=str(kube.plane.ca.cert))
    ctx.load_cert_chain(cert, key)
    try:
        with urllib.request.urlopen(kube.plane.server + path, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_bootstrap_token_gets_a_node_certificate_approved_and_nothing_more(kube, tmp_path):
    token = kube.plane.bootstrap_token()
    boot = Api(kube.plane.server, str(kube.plane.ca.cert), token)
    csr_name = f"node-csr-{NODE}"
    try:
        # The token alone may not read the cluster.
        with pytest.raises(ApiError) as info:
            boot.request("GET", ns_path("nodes"))
        assert info.value.status == 403

        key = ec.generate_private_key(ec.SECP256R1())
        boot.create(ns_path("certificatesigningrequests"), {
            "metadata": {"name": csr_name},
            "spec": {"request": _csr(key), "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                     "usages": ["digital signature", "client auth"]}})
        deadline = time.monotonic() + 60
        while True:
            status = (kube.api.get(ns_path("certificatesigningrequests", name=csr_name)) or {}).get("status") or {}
            if status.get("certificate"):
                break
            assert time.monotonic() < deadline, f"the CSR was not approved and signed: {json.dumps(status)}"
            time.sleep(0.3)
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        assert conditions["Approved"]["reason"] == "AutoApproved"  # by kube-controller-manager

        crt, pem_key = tmp_path / "node.crt", tmp_path / "node.key"
        crt.write_bytes(base64.b64decode(status["certificate"]))
        pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        # Now the node is system:node:NAME: the Node authorizer lets it read its own Node (not
        # there yet: 404, not 403) and nobody else's secrets.
        assert _get_as_cert(kube, f"/api/v1/nodes/{NODE}", crt, pem_key) == 404
        assert _get_as_cert(kube, "/api/v1/namespaces/kube-system/secrets", crt, pem_key) == 403

        wrong = Api(kube.plane.server, str(kube.plane.ca.cert), token[:7] + "0" * 16)
        with pytest.raises(ApiError) as info:
            wrong.request("GET", ns_path("certificatesigningrequests"))
        assert info.value.status == 401
        wrong.close()
    finally:
        boot.close()
        kube.api.delete(ns_path("certificatesigningrequests", name=csr_name))
        kube.api.delete(ns_path("secrets", "kube-system", f"bootstrap-token-{token.split('.')[0]}"))
