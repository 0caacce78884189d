"""The kubelet's client credentials, issued by provisioner before a switch to Kubernetes powers
the node, so that its kubelet joins at once instead of by TLS bootstrap (a bootstrap token, a
CSR the csrapprover approves, a wait for the signer: seconds on the critical path of every
switch).

What: per node an ECDSA P-256 key, made once and kept (as the SSH host keys, in the state
folder: `kubelet-certs/NODE/kubelet-client.key`, 0600, provisioner.node_files), and a client
certificate for `system:node:NODE` in group `system:nodes` (`kubelet-client.crt`), signed by the
cluster's `kubernetes.io/kube-apiserver-client-kubelet` signer through a CertificateSigningRequest
that provisioner creates and approves itself (the csrapprover approves only the CSRs a bootstrap
token or the node itself makes). Renewed when less than a third of its life is left; the
running kubelet rotates it itself from then on (rotateCertificates).

Delivered in the overlay's secret part only (an entry `kubelet_client: true`, the k8s image's
/var/lib/kubelet/kubeconfig): a node gets its own, in its boot window. Without a valid
certificate the entry writes nothing and the kubelet bootstraps with the bootstrap kubeconfig
as before: a kubelet given both a valid --kubeconfig and --bootstrap-kubeconfig skips the
bootstrap.

Never in the way of a switch: when the CSR cannot be made or approved (no RBAC right: 403; the
API down; no signer), ensure() raises OperationError and the caller logs one line, records an
event and powers the node anyway. kubernetes.kubelet_certificates: false turns it all off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioner import node_files
from provisioner.errors import OperationError
from provisioner.model import Site

log = logging.getLogger(__name__)

FOLDER = "kubelet-certs"
KEY = "kubelet-client.key"  # PEM, PKCS#8
CERT = "kubelet-client.crt"  # PEM
SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
# What the signer (csrsigning's ValidateKubeletClientCSR) accepts for a non-RSA key: exactly these.
USAGES = ("digital signature", "client auth")
GROUP = "system:nodes"
RENEW_FRACTION = 1 / 3  # renewed when less than this part of its life is left
SIGN_WAIT_S = 15.0  # how long the signer may take to sign an approved CSR


def user(node: str) -> str:
    return f"system:node:{node}"


@dataclass(frozen=True)
class Credentials:
    node: str
    certificate: bytes  # PEM
    key: bytes  # PEM
    not_before: datetime
    not_after: datetime

    def valid(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after

    def needs_renewal(self, now: datetime) -> bool:
        """Not valid now, or less than RENEW_FRACTION of its life left."""
        life = self.not_after - self.not_before
        return not self.valid(now) or self.not_after - now < life * RENEW_FRACTION


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def key(site: Site, node: str) -> bytes:
    """The node's kubelet key (PEM), made the first time."""
    try:
        return node_files.make_once(site, FOLDER, node, KEY, _new_key)[0]
    except OSError as exc:
        raise OperationError(f"node {node}: cannot read or make its kubelet key "
                             f"{node_files.path(site, FOLDER, node, KEY)}: {exc.strerror or exc}; the folder of "
                             "site.store must be writable by provisioner") from None


def csr(node: str, key_pem: bytes) -> bytes:
    """The PEM certificate request the kubelet signer accepts: CN system:node:NODE, O system:nodes,
    no SANs."""
    k = serialization.load_pem_private_key(key_pem, password=None)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, GROUP),
                         x509.NameAttribute(NameOID.COMMON_NAME, user(node))])
    req = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(k, hashes.SHA256())
    return req.public_bytes(serialization.Encoding.PEM)


def _parse(node: str, cert_pem: bytes, key_pem: bytes) -> Credentials:
    """Credentials from the PEM files; ValueError when the certificate is not the node's
    (subject, or not the key's)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    k = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key().public_numbers() != k.public_key().public_numbers():
        raise ValueError("the certificate is not for the node's kubelet key")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != user(node):
        raise ValueError(f"the certificate's subject is not {user(node)}")
    return Credentials(node, cert_pem, key_pem, cert.not_valid_before_utc, cert.not_valid_after_utc)


def current(site: Site, node: str) -> Credentials | None:
    """The node's credentials as kept, or None (none yet; unreadable, not the node's: logged)."""
    try:
        cert_pem = node_files.read(site, FOLDER, node, CERT)
        key_pem = node_files.read(site, FOLDER, node, KEY) if cert_pem else None
    except OSError as exc:
        log.warning("node %s: cannot read its kubelet credentials in %s: %s", node,
                    node_files.folder(site, FOLDER), exc.strerror or exc)
        return None
    if not (cert_pem and key_pem):
        return None
    try:
        return _parse(node, cert_pem, key_pem)
    except ValueError as exc:
        log.warning("node %s: its kept kubelet certificate is not usable (%s); a new one is issued before its "
                    "next switch to Kubernetes", node, str(exc).splitlines()[0])
        return None


def for_overlay(site: Site, node: str, now: datetime | None = None) -> Credentials | None:
    """What the overlay's kubelet_client entry delivers: the node's credentials when they are on,
    kept and valid now; else None (the node bootstraps)."""
    if not site.kubernetes.kubelet_certificates:
        return None
    creds = current(site, node)
    return creds if creds is not None and creds.valid(now or _now()) else None


@dataclass(frozen=True)
class Outcome:
    node: str
    issued: bool  # a new certificate was signed now (False: the kept one serves)
    not_after: datetime

    @property
    def message(self) -> str:
        until = self.not_after.strftime("%Y-%m-%d %H:%M UTC")
        if self.issued:
            return f"kubelet client certificate for {user(self.node)} signed, valid until {until}"
        return f"kubelet client certificate for {user(self.node)} kept, valid until {until}"


def ensure(site: Site, kube, node: str, now: datetime | None = None) -> Outcome:
    """A valid kubelet client certificate for the node, with more than RENEW_FRACTION of its life
    left: the kept one, or one signed now (kube.sign_kubelet_csr: create, approve, wait). Raises
    OperationError (never with key material) when it cannot be had."""
    now = now or _now()
    creds = current(site, node)
    if creds is not None and not creds.needs_renewal(now):
        return Outcome(node, False, creds.not_after)
    key_pem = key(site, node)
    cert_pem = kube.sign_kubelet_csr(node, csr(node, key_pem), SIGNER, USAGES, SIGN_WAIT_S)
    try:
        creds = _parse(node, cert_pem, key_pem)
    except ValueError as exc:
        raise OperationError(f"node {node}: the signed kubelet certificate is not usable ({exc}); "
                             "check the kube-apiserver-client-kubelet signer") from None
    try:
        node_files.replace(site, FOLDER, node, CERT, cert_pem, 0o600)
    except OSError as exc:
        raise OperationError(f"node {node}: cannot keep its kubelet certificate in {node_files.folder(site, FOLDER)}: "
                             f"{exc.strerror or exc}") from None
    return Outcome(node, True, creds.not_after)
