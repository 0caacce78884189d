"""A real Kubernetes control plane on 127.0.0.1 for the tests, the demo and the benchmarks:
etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from their published
Go modules by tools/build.sh (pinned in tools/k8s and tools/etcd) and run from
~/.cache/provisioner. Free ports, a private folder, stopped by pid: nothing is left behind.

Identities (static tokens, RBAC as in a real cluster):
- admin (system:masters): the test world itself, kubectl in the tests;
- provisioner: the product, with only the rights examples/kubernetes/provisioner-rbac.yaml
  grants (applied at start, so the shipped example is what the tests run under);
- system:kube-controller-manager and system:kube-scheduler for the two controllers.

The node-lifecycle controller watches the Leases with a short grace period (grace_s), so a node
whose (simulated or real) kubelet stops renewing goes NotReady within seconds, as in production
within 40 s. The API server writes an audit log of the provisioner's requests (audit()), which
is how the tests check what the product did, and did not do, on the wire.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import time
from pathlib import Path

import yaml

from testbed.kube_api import Api, ns_path
from testbed.pki import CA, service_account_keys
from testbed.process import ROOT, Daemon, free_port, http_probe

VERSION = "v1.34.3"  # the pin in tools/k8s/go.mod; the tests check the server says so
RBAC_EXAMPLE = ROOT / "examples" / "kubernetes" / "provisioner-rbac.yaml"
NODE_BOOTSTRAP_EXAMPLE = ROOT / "examples" / "kubernetes" / "node-bootstrap-rbac.yaml"
PROVISIONER_USER = "provisioner"


class BinariesMissing(RuntimeError):
    pass


def component_dir(name: str) -> Path:
    """Where tools/build.sh puts (or has put) component `name` (k8s, etcd) for the current pins."""
    out = subprocess.run([str(ROOT / "tools" / "build.sh"), name, "--print-dir"], capture_output=True, text=True)
    if out.returncode != 0:
        raise BinariesMissing(out.stderr.strip())
    return Path(out.stdout.strip()) / "bin"


def binaries() -> dict[str, Path]:
    """Paths of the built binaries; BinariesMissing says how to build them."""
    found = {}
    for comp, names in (("k8s", ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
                                 "kubelet")), ("etcd", ("etcd",))):
        folder = component_dir(comp)
        for n in names:
            if not os.access(folder / n, os.X_OK):
                raise BinariesMissing(f"{n} is not built ({folder / n}); run `make kube-bins` "
                                      f"(tools/build.sh {comp}: a one-time build from the Go module proxy)")
            found[n] = folder / n
    return found


class ControlPlane:
    def __init__(self, folder: str | os.PathLike, *, grace_s: int = 8, extra_sans: tuple[str, ...] = ("10.0.2.2",)):
        self._probes: dict[str, object] = {}
        self.folder = Path(folder).resolve()
        self.grace_s = grace_s
        self.extra_sans = extra_sans
        self.bins = binaries()
        self.daemons: dict[str, Daemon] = {}
        self.tokens: dict[str, str] = {}
        self.port = 0
        self.api: Api | None = None
        self.ca: CA | None = None
        self.audit_log = self.folder / "audit.log"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- start and stop -----------------------------------------------------------------

    def start(self, timeout: float = 120) -> "ControlPlane":
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        pki = f / "pki"
        self.ca = CA.create(pki)
        serving = self.ca.issue("apiserver", "kube-apiserver", client=False,
                                server_names=("127.0.0.1", "localhost", "10.0.0.1", "kubernetes",
                                              "kubernetes.default", "kubernetes.default.svc", *self.extra_sans))
        kubelet_client = self.ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                       ("system:masters",))
        sa_key, sa_pub = service_account_keys(pki)
        users = {"admin": ("1", "system:masters"), PROVISIONER_USER: ("2", ""),
                 "system:kube-controller-manager": ("3", ""), "system:kube-scheduler": ("4", "")}
        self.tokens = {u: secrets.token_hex(16) for u in users}
        (f / "tokens.csv").write_text("".join(f'{self.tokens[u]},{u},{uid},"{g}"\n' for u, (uid, g) in users.items()))
        (f / "tokens.csv").chmod(0o600)
        (f / "audit-policy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": [PROVISIONER_USER]}, {"level": "None"}]}))

        etcd_port, peer_port = free_port(), free_port()
        self._run("etcd", [
            str(self.bins["etcd"]), "--name", "test", "--data-dir", str(f / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn"], etcd_port,
            http_probe(f"http://127.0.0.1:{etcd_port}/health"), timeout)

        self.port = free_port()
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        admin = {"Authorization": f"Bearer {self.tokens['admin']}"}
        self._run("kube-apiserver", [
            str(self.bins["kube-apiserver"]), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
            f"--client-ca-file={self.ca.cert}", f"--token-auth-file={f / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            # Real kubelets (the k8s image in the VMs) join with a bootstrap token, as at a site.
            "--enable-bootstrap-token-auth=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            # A loopback advertise address cannot go into the kubernetes Service's endpoints.
            "--endpoint-reconciler-type=none",
            f"--kubelet-client-certificate={kubelet_client[0]}", f"--kubelet-client-key={kubelet_client[1]}",
            f"--kubelet-certificate-authority={self.ca.cert}",
            f"--audit-policy-file={f / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--audit-log-maxbackup=1", "--profiling=false", "--v=1"], self.port,
            http_probe(f"{self.server}/readyz", ctx, admin), timeout)
        self.api = Api(self.server, str(self.ca.cert), self.tokens["admin"])
        self.apply(RBAC_EXAMPLE)
        self.apply(NODE_BOOTSTRAP_EXAMPLE)

        kcm_port = free_port()
        self._run("kube-controller-manager", [
            str(self.bins["kube-controller-manager"]), f"--kubeconfig={self.kubeconfig('system:kube-controller-manager')}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={f / 'kcm-certs'}", "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={self.ca.cert}",
            f"--cluster-signing-cert-file={self.ca.cert}", f"--cluster-signing-key-file={self.ca.key}",
            # Node lifecycle: a silent node is NotReady after grace_s (production: 40 s).
            "--node-monitor-period=1s", f"--node-monitor-grace-period={self.grace_s}s",
            "--kube-api-qps=200", "--kube-api-burst=400", "--v=1"], kcm_port,
            http_probe(f"https://127.0.0.1:{kcm_port}/healthz", _insecure()), timeout)
        sched_port = free_port()
        # Retries of unschedulable pods after 1-2 s (default 1-10 s): a pod that fits once a node
        # turns Ready is placed within a second or two, which keeps the tests short.
        (f / "scheduler.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig("system:kube-scheduler")), "qps": 200,
                                 "burst": 400},
            "leaderElection": {"leaderElect": False}, "podInitialBackoffSeconds": 1, "podMaxBackoffSeconds": 2}))
        self._run("kube-scheduler", [
            str(self.bins["kube-scheduler"]), f"--config={f / 'scheduler.yaml'}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}", f"--cert-dir={f / 'scheduler-certs'}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics", "--v=1"], sched_port,
            http_probe(f"https://127.0.0.1:{sched_port}/healthz", _insecure()), timeout)
        # Pods can be created once the service-account controller made the namespace's account.
        self.wait_service_account("default", timeout)

    def _run(self, name: str, cmd: list[str], port: int, probe, timeout: float) -> None:
        self._probes[name] = probe
        self.daemons[name] = Daemon(cmd, port, self.folder / f"{name}.log", env={"PATH": "/usr/bin:/bin"},
                                    name=name).start(probe, timeout)

    def stop_apiserver(self) -> None:
        """The API server goes down (etcd and the controllers stay): clients get connection refused."""
        self.daemons["kube-apiserver"].stop()

    def start_apiserver(self, timeout: float = 120) -> None:
        """The same API server again, on the same port and certificates, over the same etcd; back
        once the scheduler, whose watches broke, places pods again (a probe pod it must find
        unschedulable), so the next test meets a working cluster."""
        self.daemons["kube-apiserver"].start(self._probes["kube-apiserver"], timeout)
        probe = ns_path("pods", "default", "scheduler-probe")
        self.api.delete(probe, {"gracePeriodSeconds": 0})
        self.api.create(ns_path("pods", "default"), {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "scheduler-probe", "namespace": "default"},
            "spec": {"nodeSelector": {"testbed.provisioner/probe": "nowhere"}, "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": "registry.invalid/probe:1"}]}})
        deadline = time.monotonic() + timeout
        try:
            while not any(c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"
                          for c in ((self.api.get(probe) or {}).get("status") or {}).get("conditions") or []):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kube-scheduler did not come back within {timeout:.0f} s after the API "
                                       f"server restarted: {self.folder / 'kube-scheduler.log'}")
                time.sleep(0.2)
        finally:
            self.api.delete(probe, {"gracePeriodSeconds": 0})

    def stop(self) -> None:
        """Stop everything, controllers first, etcd last; safe to call twice."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            d = self.daemons.pop(name, None)
            if d:
                d.stop()
        if self.api:
            self.api.close()
            self.api = None

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        return {n: d.pid for n, d in self.daemons.items() if d.running()}

    # -- clients ----------------------------------------------------------------------------

    def kubeconfig(self, user: str = "admin", path: str | os.PathLike | None = None, token: str | None = None,
                   server: str | None = None) -> Path:
        """A kubeconfig for one of the identities (or any token), with the cluster's CA."""
        path = Path(path) if path else self.folder / f"kubeconfig-{user.replace(':', '-')}"
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
               "clusters": [{"name": "test", "cluster": {"server": server or self.server,
                                                         "certificate-authority": str(self.ca.cert)}}],
               "users": [{"name": user, "user": {"token": token or self.tokens[user]}}],
               "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}]}
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def bootstrap_token(self) -> str:
        """A node bootstrap token ("id.secret") for real kubelets, valid for an hour: the Secret
        kubeadm's `token create` would make (the rights come from NODE_BOOTSTRAP_EXAMPLE)."""
        token_id, secret = secrets.token_hex(3), secrets.token_hex(8)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        self.api.create(ns_path("secrets", "kube-system"), {
            "metadata": {"name": f"bootstrap-token-{token_id}", "namespace": "kube-system"},
            "type": "bootstrap.kubernetes.io/token",
            "stringData": {"token-id": token_id, "token-secret": secret, "expiration": expires,
                           "usage-bootstrap-authentication": "true", "usage-bootstrap-signing": "true"}})
        return f"{token_id}.{secret}"

    def apply(self, manifest: Path) -> None:
        """Create (or replace) the cluster-scoped RBAC objects of a YAML file."""
        for doc in yaml.safe_load_all(manifest.read_text()):
            if not doc:
                continue
            kind = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings"}[doc["kind"]]
            name = doc["metadata"]["name"]
            self.api.delete(ns_path(kind, name=name))
            self.api.create(ns_path(kind), doc)

    def wait_service_account(self, namespace: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.api.get(ns_path("serviceaccounts", namespace, "default")) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no service account default in namespace {namespace} after {timeout:.0f} s: "
                                   f"is kube-controller-manager running? {self.folder / 'kube-controller-manager.log'}")
            time.sleep(0.2)

    def audit(self, since: int = 0, user: str = PROVISIONER_USER) -> list[dict]:
        """The provisioner's requests the API server logged after byte offset `since`, oldest
        first: {verb, uri, code, resource, subresource, name}."""
        try:
            with open(self.audit_log, "rb") as fh:
                fh.seek(since)
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written
            if (e.get("user") or {}).get("username") != user:
                continue
            ref = e.get("objectRef") or {}
            out.append({"verb": e.get("verb"), "uri": e.get("requestURI"),
                        "code": (e.get("responseStatus") or {}).get("code"), "resource": ref.get("resource"),
                        "subresource": ref.get("subresource"), "name": ref.get("name")})
        return out

    def audit_mark(self) -> int:
        try:
            return self.audit_log.stat().st_size
        except FileNotFoundError:
            return 0


def _insecure() -> ssl.SSLContext:
    """The controllers' health ports serve a self-signed certificate; only liveness is asked."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def kubectl_path() -> Path:
    return binaries()["kubectl"]


__all__ = ["ControlPlane", "BinariesMissing", "binaries", "kubectl_path", "VERSION", "PROVISIONER_USER"]
