"""A small JSON client for the test world's own calls to the real API server (arranging a
cluster, the simulated kubelets, waiting for the controllers). The product's adapter uses the
official client; this one stays out of its way and keeps the test harness fast: plain dicts,
no model classes."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import urllib3

JSON = "application/json"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, method: str, path: str, status: int, body: str):
        self.status, self.body = status, body
        try:
            message = json.loads(body).get("message") or body
        except ValueError:
            message = body
        super().__init__(f"{method} {path}: HTTP {status}: {message[:500]}")


class Api:
    def __init__(self, server: str, ca_file: str, token: str):
        self.server = server.rstrip("/")
        self.token = token
        self.http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca_file, maxsize=8,
                                        timeout=urllib3.Timeout(connect=5, read=60), retries=False)

    def request(self, method: str, path: str, body: Any = None, *, params: dict | None = None,
                ctype: str = JSON, ok_missing: bool = False) -> dict | None:
        """One call. A 404 returns None when ok_missing, every other non-2xx raises ApiError."""
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        headers = {"Authorization": f"Bearer {self.token}", "Accept": JSON}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = ctype
        r = self.http.request(method, url, body=data, headers=headers)
        if r.status == 404 and ok_missing:
            return None
        if r.status >= 300:
            raise ApiError(method, path, r.status, r.data.decode(errors="replace"))
        return json.loads(r.data) if r.data else None

    def get(self, path: str, **params) -> dict | None:
        return self.request("GET", path, params=params or None, ok_missing=True)

    def items(self, path: str, **params) -> list[dict]:
        """Every item of a list, page by page."""
        out, token = [], None
        while True:
            page = self.request("GET", path, params={**params, "limit": 500, "continue": token})
            out.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return out

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, ctype: str = STRATEGIC, ok_missing: bool = False) -> dict | None:
        return self.request("PATCH", path, body, ctype=ctype, ok_missing=ok_missing)

    def delete(self, path: str, body: dict | None = None, **params) -> dict | None:
        return self.request("DELETE", path, body, params=params or None, ok_missing=True)

    def close(self) -> None:
        self.http.clear()


def ns_path(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """/api/v1/... or /apis/GROUP/VERSION/... for the few kinds the test world uses."""
    groups = {"pods": "/api/v1", "nodes": "/api/v1", "namespaces": "/api/v1", "serviceaccounts": "/api/v1", "secrets": "/api/v1",
              "leases": "/apis/coordination.k8s.io/v1", "poddisruptionbudgets": "/apis/policy/v1",
              "replicasets": "/apis/apps/v1", "daemonsets": "/apis/apps/v1", "deployments": "/apis/apps/v1",
              "clusterroles": "/apis/rbac.authorization.k8s.io/v1",
              "clusterrolebindings": "/apis/rbac.authorization.k8s.io/v1",
              "validatingwebhookconfigurations": "/apis/admissionregistration.k8s.io/v1",
              "certificatesigningrequests": "/apis/certificates.k8s.io/v1"}
    path = groups[kind] + (f"/namespaces/{namespace}" if namespace else "") + f"/{kind}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path
