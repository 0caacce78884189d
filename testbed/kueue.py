"""Kueue's real controller manager next to the test control plane (testbed/kube_control_plane.py).

Built from its Go module by tools/build.sh (pinned in tools/kueue), with the CRDs it needs (its
own, and the ProvisioningRequest CRD of the autoscaler API version it requires) and its webhook
configurations copied from Go's module cache into the build's share/ folder. It runs as a
process on 127.0.0.1, outside the cluster, as a site may run it while trying it out:
- its kubeconfig: the cluster admin's;
- its config file: no leader election, health and metrics on free loopback ports, the batch/Job
  integration only, webhook certificates given (issued by the test CA for 127.0.0.1), Kueue's own
  certificate management off;
- its webhooks: the configurations Kueue ships, for Jobs and Kueue's own kinds only, pointed at
  https://127.0.0.1:PORT with the test CA; removed again by stop() (a Job webhook that no one
  serves would block every Job in the session's cluster).
"""

from __future__ import annotations

import base64
import os
import socket
import time
from pathlib import Path

import yaml

from testbed.kube_api import ApiError
from testbed.kube_control_plane import BinariesMissing, component_dir
from testbed.process import Daemon, free_port, http_probe

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
HOOKS = "/apis/admissionregistration.k8s.io/v1/"
GROUPS = {"batch", "kueue.x-k8s.io"}  # webhooks kept: Jobs (the one integration on) and Kueue's kinds
PREFIX = "kueue-test-"


def build_dir() -> Path:
    """tools/build.sh's folder for the pinned Kueue (bin/kueue, share/crds, share/webhook)."""
    folder = component_dir("kueue").parent
    if not os.access(folder / "bin" / "kueue", os.X_OK) or not (folder / "share" / "crds").is_dir():
        raise BinariesMissing(f"Kueue is not built ({folder}); run `make kube-bins` (tools/build.sh kueue: a "
                              "one-time build from the Go module proxy)")
    return folder


class Kueue:
    def __init__(self, cluster, folder: str | os.PathLike):
        self.cluster = cluster  # testbed.kube_cluster.KubeCluster
        self.folder = Path(folder).resolve()
        self.build = build_dir()
        self.daemon: Daemon | None = None
        self.hooks: list[tuple[str, str]] = []

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon and self.daemon.running() else None

    def start(self, timeout: float = 180) -> "Kueue":
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        api, plane = self.cluster.api, self.cluster.plane
        self.apply_crds(timeout)
        if api.get("/api/v1/namespaces/kueue-system") is None:
            api.create("/api/v1/namespaces", {"metadata": {"name": "kueue-system"}})
        certs = f / "certs"
        certs.mkdir(exist_ok=True)
        crt, key = plane.ca.issue("kueue-webhook", "kueue-webhook", client=False, server_names=("127.0.0.1",))
        (certs / "tls.crt").write_bytes(crt.read_bytes())
        (certs / "tls.key").write_bytes(key.read_bytes())
        (certs / "tls.key").chmod(0o600)
        health, metrics, hook_port, visibility = free_port(), free_port(), free_port(), free_port()
        (f / "config.yaml").write_text(yaml.safe_dump({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": f"127.0.0.1:{metrics}"},
            "webhook": {"port": hook_port, "host": "127.0.0.1", "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
            "clientConnection": {"qps": 50, "burst": 100},
        }))
        kubeconfig = plane.kubeconfig("admin", f / "kubeconfig")
        # Without its own certificate management, Kueue reads its metrics server's certificate from
        # the fixed path /etc/kueue/metrics/certs: it gets one in a private mount namespace, where
        # this folder's etc/ stands for /etc; the host's /etc is never written.
        metrics_certs = f / "etc" / "kueue" / "metrics" / "certs"
        metrics_certs.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            (metrics_certs / name).write_bytes((certs / name).read_bytes())
        (metrics_certs / "tls.key").chmod(0o600)
        cmd = [str(self.build / "bin" / "kueue"), f"--config={f / 'config.yaml'}", f"--kubeconfig={kubeconfig}",
               f"--visibility-server-port={visibility}", "--feature-gates=VisibilityOnDemand=false",
               "--zap-log-level=info"]
        self.daemon = Daemon(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              'mount --bind "$0" /etc && exec "$@"', str(f / "etc"), *cmd],
                             health, f / "kueue.log", env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(kubeconfig)},
                             name="kueue").start(http_probe(f"http://127.0.0.1:{health}/readyz"), timeout)
        self.register_webhooks(hook_port, plane.ca.cert)
        # The webhook server listens (the API server calls it for the next Job).
        deadline = time.monotonic() + 30
        while not _listens(hook_port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kueue's webhook server does not listen on 127.0.0.1:{hook_port}; last lines of "
                                   f"{f / 'kueue.log'}:\n{self.log_tail()}")
            time.sleep(0.2)

    def apply_crds(self, timeout: float) -> None:
        api = self.cluster.api
        names = []
        for path in sorted((self.build / "share" / "crds").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                name = doc["metadata"]["name"]
                names.append(name)
                if api.get(f"{CRDS}/{name}") is None:
                    api.create(CRDS, doc)
        deadline = time.monotonic() + timeout
        for name in names:
            while not any(c.get("type") == "Established" and c.get("status") == "True"
                          for c in ((api.get(f"{CRDS}/{name}") or {}).get("status") or {}).get("conditions") or []):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CRD {name} not Established after {timeout:.0f} s")
                time.sleep(0.2)

    def register_webhooks(self, port: int, ca_file: Path) -> None:
        api = self.cluster.api
        bundle = base64.b64encode(Path(ca_file).read_bytes()).decode()
        for doc in yaml.safe_load_all((self.build / "share" / "webhook" / "manifests.yaml").read_text()):
            if not doc:
                continue
            hooks = []
            for h in doc.get("webhooks") or []:
                if not {g for r in h.get("rules") or [] for g in r.get("apiGroups") or []} <= GROUPS:
                    continue
                path = ((h.get("clientConfig") or {}).get("service") or {}).get("path") or "/"
                h["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
                hooks.append(h)
            kind = doc["kind"].lower() + "s"
            name = PREFIX + doc["metadata"]["name"]
            api.delete(f"{HOOKS}{kind}/{name}")
            api.create(f"{HOOKS}{kind}", {"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                                          "metadata": {"name": name}, "webhooks": hooks})
            self.hooks.append((kind, name))

    def stop(self) -> None:
        """Webhooks first (nothing may call a stopped server), then the process; twice is fine."""
        for kind, name in self.hooks:
            try:
                self.cluster.api.delete(f"{HOOKS}{kind}/{name}")
            except ApiError:
                pass
        self.hooks = []
        if self.daemon:
            self.daemon.stop()
            self.daemon = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.daemon.tail(chars) if self.daemon else ""


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
