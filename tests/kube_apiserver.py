"""A small, strict Kubernetes API server for the tests (no kube-apiserver can be installed here).

It speaks the real REST API for the objects provisioner uses, so that both the official Python
client and Debian's kubectl 1.20 can talk to it unchanged:

- discovery: /version, /api, /apis, /api/v1, /apis/apps/v1, /apis/policy/v1, /apis/policy/v1beta1
- nodes (get, list, patch, update, delete); pods, namespaced and across namespaces (get, list,
  patch, update, delete); pods/eviction (policy/v1 and policy/v1beta1 bodies: kubectl 1.20 sends
  v1beta1, the current Python client v1); PodDisruptionBudgets (policy/v1, v1beta1) and
  DaemonSets (apps/v1) to read
- labelSelector (=, ==, !=, in, notin, exists, !exists) and fieldSelector (per-resource fields,
  as the real server allows), limit/continue
- PATCH with merge-patch, strategic-merge-patch and json-patch; 415 for any other content type
- resourceVersion: 409 Conflict on a stale one (PUT, or a PATCH that carries one)
- eviction answers 429 when a PodDisruptionBudget forbids it, with the real Status and causes
- Status objects on every error; Table output when the client asks for `as=Table` (kubectl get)
- bearer-token auth (401 otherwise), TLS with its own CA (in the kubeconfig it writes)
- knobs: `fail(500)` answers every request with that status; `down()` stops listening

Tests set the state up (add_node, add_pod, add_pdb, ...) and simulate the cluster around the
API: `schedule()` is the scheduler (binds pending pods to Ready, schedulable nodes labelled
sched=k8s, or marks them Unschedulable), `set_node_ready()` is a kubelet coming or going.

Standalone (for the demo): python -m tests.kube_apiserver --port 6443 --state state.yaml
--kubeconfig kubeconfig.yaml [--schedule-every 2]
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import http.server
import json
import math
import re
import secrets
import signal
import socket
import ssl
import tempfile
import threading
import urllib.parse
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from kubernetes.utils import parse_quantity

SERVER_VERSION = {
    "major": "1",
    "minor": "23",
    "gitVersion": "v1.23.17",
    "gitCommit": "provisioner-test-apiserver",
    "gitTreeState": "clean",
    "buildDate": "2023-01-18T15:51:25Z",
    "goVersion": "go1.19.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
KUBELET_VERSION = "v1.23.17"

PATCH_TYPES = (
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
)


# --------------------------------------------------------------------------- resources

class Res:
    """One served resource: where it lives in the API and what may be done with it."""

    def __init__(self, plural, kind, group, versions, namespaced, verbs, fields, short=()):
        self.plural, self.kind, self.group = plural, kind, group
        self.versions, self.namespaced, self.verbs = versions, namespaced, verbs
        self.fields = fields  # field selectors the real server supports for this resource
        self.short = list(short)


_META_FIELDS = ("metadata.name", "metadata.namespace")
RESOURCES = {
    "nodes": Res("nodes", "Node", "", ("v1",), False, ("delete", "get", "list", "patch", "update"),
                 ("metadata.name", "spec.unschedulable"), ("no",)),
    "pods": Res("pods", "Pod", "", ("v1",), True, ("delete", "get", "list", "patch", "update"),
                (*_META_FIELDS, "spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                 "spec.serviceAccountName", "status.phase", "status.podIP", "status.nominatedNodeName"),
                ("po",)),
    "daemonsets": Res("daemonsets", "DaemonSet", "apps", ("v1",), True, ("get", "list"), _META_FIELDS, ("ds",)),
    "poddisruptionbudgets": Res("poddisruptionbudgets", "PodDisruptionBudget", "policy", ("v1", "v1beta1"), True,
                                ("get", "list"), _META_FIELDS, ("pdb",)),
}
GROUPS = {"apps": ("v1",), "policy": ("v1", "v1beta1")}


def _resources_for(group: str, version: str) -> list[Res]:
    return [r for r in RESOURCES.values() if r.group == group and version in r.versions]


def api_version(res: Res, version: str) -> str:
    return f"{res.group}/{version}" if res.group else version


# --------------------------------------------------------------------------- errors

class ApiError(Exception):
    """Becomes a metav1.Status response."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def not_found(res: Res, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.plural} "{name}" not found', {"name": name, "kind": res.plural})


def conflict(res: Res, name: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                    {"name": name, "kind": res.plural})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(res: Res, name: str, field: str, value: Any, why: str) -> ApiError:
    msg = f'{res.kind} "{name}" is invalid: {field}: Invalid value: {json.dumps(value)}: {why}'
    return ApiError(422, "Invalid", msg, {"name": name, "kind": res.kind, "causes": [
        {"reason": "FieldValueInvalid", "message": f"Invalid value: {json.dumps(value)}: {why}", "field": field}]})


# --------------------------------------------------------------------------- selectors

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside parentheses (`a in (x,y),b`)."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_label_selector(s: str) -> list[tuple[str, str, tuple[str, ...]]]:
    if not s or not s.strip():
        return []
    reqs = []
    for part in _split_top(s):
        m = (re.match(r"^(!)?\s*([^\s=!(),]+)$", part)
             or re.match(r"^([^\s=!(),]+)\s*(==|=|!=)\s*([^\s=!(),]*)$", part)
             or re.match(r"^([^\s=!(),]+)\s+(in|notin)\s+\(([^()]*)\)$", part))
        if not m:
            raise bad_request(f"unable to parse requirement: invalid label selector: {part!r}")
        g = m.groups()
        if len(g) == 2:  # exists / !exists
            key, op, values = g[1], ("!" if g[0] else "exists"), ()
        elif g[1] in ("in", "notin"):
            key, op = g[0], g[1]
            values = tuple(v.strip() for v in g[2].split(","))
        else:
            key, op, values = g[0], ("!=" if g[1] == "!=" else "="), (g[2],)
        if not _LABEL_KEY.match(key):
            raise bad_request(f"unable to parse requirement: invalid label key {key!r}")
        for v in values:
            if not _LABEL_VALUE.match(v) or len(v) > 63:
                raise bad_request(f"unable to parse requirement: invalid label value: {v!r}")
        reqs.append((key, op, values))
    return reqs


def labels_match(reqs, labels: dict) -> bool:
    for key, op, values in reqs:
        have = key in labels
        if op == "exists" and not have:
            return False
        if op == "!" and have:
            return False
        if op in ("=", "in") and (not have or labels[key] not in values):
            return False
        if op in ("!=", "notin") and have and labels[key] in values:
            return False
    return True


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A metav1.LabelSelector object (matchLabels + matchExpressions); empty matches everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], tuple(e.get("values") or ())
        op = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}[op]
        if not labels_match([(key, op, values)], labels):
            return False
    return True


def parse_field_selector(s: str, res: Res) -> list[tuple[str, bool, str]]:
    if not s or not s.strip():
        return []
    out = []
    for part in s.split(","):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid selector: {part!r}; can't understand {part!r}")
        field, op, value = m.groups()
        if field not in res.fields:
            raise bad_request(f'field label not supported: {field}')
        out.append((field, op != "!=", value))
    return out


def _field_value(obj: dict, field: str) -> str:
    cur: Any = obj
    for part in field.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def fields_match(reqs, obj: dict) -> bool:
    return all((_field_value(obj, f) == v) == eq for f, eq, v in reqs)


# --------------------------------------------------------------------------- patches

class PatchError(Exception):
    def __init__(self, message: str, code: int = 422):
        super().__init__(message)
        self.code = code


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# Lists that strategic merge patches merge by key (the patchMergeKey tags of the core types used
# here); every other list is replaced, as the real server does.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
              "ports": "containerPort", "volumeMounts": "mountPath", "volumes": "name", "conditions": "type",
              "addresses": "type", "ownerReferences": "uid", "imagePullSecrets": "name"}
PRIMITIVE_MERGE_LISTS = {"finalizers", "podCIDRs"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    if directive is not None:
        raise PatchError(f"Unknown patch type: {directive}", 400)
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k in ("$retainKeys",) or k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            out[name] = [x for x in out.get(name) or [] if x not in (v or [])]
            continue
        if k.startswith("$"):
            raise PatchError(f"unsupported strategic merge patch directive {k}", 400)
        if v is None:
            out.pop(k, None)
        elif isinstance(v, list) and k in MERGE_KEYS:
            out[k] = _merge_list(out.get(k) or [], v, MERGE_KEYS[k])
        elif isinstance(v, list) and k in PRIMITIVE_MERGE_LISTS:
            out[k] = list(out.get(k) or []) + [x for x in v if x not in (out.get(k) or [])]
        else:
            merged = strategic_merge_patch(out.get(k), v)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
    if retain is not None:
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(current: list, patch: list, key: str) -> list:
    out = [copy.deepcopy(x) for x in current]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"map: {item!r} does not contain declared merge key: {key}", 400)
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
        elif idx is None:
            out.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            out[idx] = strategic_merge_patch(out[idx], item)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer must start with '/': {path!r}", 400)
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise PatchError(f"doc is missing path: /{'/'.join(parts)}")
    return cur


def _json_add(doc: Any, parts: list[str], value: Any, replace: bool = False) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"replace operation does not apply: doc is missing key: /{'/'.join(parts)}")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = value
            else:
                parent.insert(int(last), value)
        else:
            raise PatchError(f"index out of range: /{'/'.join(parts)}")
    else:
        raise PatchError(f"doc is missing path: /{'/'.join(parts)}")
    return doc


def _json_remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise PatchError(f"remove operation does not apply: doc is missing path: /{'/'.join(parts)}")


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch."""
    if not isinstance(ops, list):
        raise PatchError("json: cannot unmarshal object into Go value of type []handlers.jsonPatchOp", 400)
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}", 400)
        kind, parts = op["op"], _pointer(op["path"])
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} operation needs a value", 400)
        if kind == "add":
            doc = _json_add(doc, parts, copy.deepcopy(op["value"]))
        elif kind == "replace":
            doc = _json_add(doc, parts, copy.deepcopy(op["value"]), replace=True)
        elif kind == "remove":
            _json_remove(doc, parts)
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = _json_remove(doc, src) if kind == "move" else copy.deepcopy(_walk(doc, src))
            doc = _json_add(doc, parts, value)
        elif kind == "test":
            if _walk(doc, parts) != op["value"]:
                raise PatchError(f"testing value /{'/'.join(parts)} failed: test failed")
        else:
            raise PatchError(f"Unexpected kind: {kind}", 400)
    return doc


# --------------------------------------------------------------------------- helpers

def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    then = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    s = max(0, int((dt.datetime.now(dt.timezone.utc) - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _cpu_m(q: Any) -> int:
    return int(math.ceil(parse_quantity(q) * 1000))


def _bytes(q: Any) -> int:
    return int(math.ceil(parse_quantity(q)))


def _controller(obj: dict) -> dict | None:
    return next((o for o in obj["metadata"].get("ownerReferences") or [] if o.get("controller")), None)


def _condition(obj: dict, ctype: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c.get("type") == ctype), None)


def _pod_requests(pod: dict) -> dict[str, int]:
    total = {"cpu": 0, "memory": 0}
    for c in pod["spec"].get("containers") or []:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            total[k] = total.get(k, 0) + (_cpu_m(v) if k == "cpu" else _bytes(v))
    return total


def _pdb_int(value: Any, expected: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        x = int(value[:-1]) * expected / 100
        return math.ceil(x) if round_up else math.floor(x)
    return int(value)


# --------------------------------------------------------------------------- TLS

def _make_tls(folder: Path) -> tuple[Path, Path, bytes]:
    """A CA and a server certificate for 127.0.0.1 (what a kubeadm cluster has, in miniature)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provisioner-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
                x509.DNSName("kubernetes.default.svc")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = folder / "apiserver.crt", folder / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- the cluster state

class Cluster:
    """The objects, their resourceVersions, and the simulated controllers (scheduler, kubelet,
    disruption controller). Thread-safe: every method takes the lock."""

    def __init__(self, label_key: str = "sched", respawn: bool = True):
        self.lock = threading.RLock()
        self.label_key = label_key
        self.respawn = respawn  # evicted ReplicaSet pods come back as new Pending pods
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.rv = 1000
            self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object

    # -- storage ------------------------------------------------------------------

    def _key(self, res: Res, ns: str | None, name: str) -> tuple[str, str, str]:
        return (res.plural, (ns or "") if res.namespaced else "", name)

    def _store(self, res: Res, obj: dict) -> dict:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[(res.plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])] = obj
        return obj

    def _new_meta(self, name: str, namespace: str | None = None, **extra) -> dict:
        meta = {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now()}
        if namespace is not None:
            meta["namespace"] = namespace
        meta.update({k: v for k, v in extra.items() if v})
        return meta

    def get(self, plural: str, namespace: str | None, name: str) -> dict | None:
        with self.lock:
            obj = self.objects.get((plural, namespace or "", name))
            return copy.deepcopy(obj) if obj else None

    def items(self, plural: str, namespace: str | None = None) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (p, ns, _), o in sorted(self.objects.items())
                    if p == plural and (namespace is None or ns == namespace)]

    # -- set-up (what a test arranges) ------------------------------------------------

    def add_node(self, name: str, *, labels: dict | None = None, annotations: dict | None = None,
                 ready: bool = True, unschedulable: bool = False, cpu: str = "4", memory: str = "16Gi",
                 gpus: int = 0, taints: list | None = None, ip: str | None = None) -> dict:
        capacity = {"cpu": str(cpu), "memory": str(memory), "pods": "110", "ephemeral-storage": "50Gi"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        spec: dict = {}
        if unschedulable:
            spec["unschedulable"] = True
        if taints:
            spec["taints"] = taints
        with self.lock:
            index = sum(1 for k in self.objects if k[0] == "nodes") + 1
            obj = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": self._new_meta(name, labels={
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64", **(labels or {})},
                    annotations=annotations),
                "spec": spec,
                "status": {
                    "capacity": capacity, "allocatable": dict(capacity),
                    "conditions": [self._ready_condition(ready)],
                    "addresses": [{"type": "InternalIP", "address": ip or f"10.0.9.{index}"},
                                  {"type": "Hostname", "address": name}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                    "nodeInfo": {"machineID": uuid.uuid4().hex, "systemUUID": str(uuid.uuid4()),
                                 "bootID": str(uuid.uuid4()), "kernelVersion": "6.1.0-18-amd64",
                                 "osImage": "provisioner k8s image", "containerRuntimeVersion": "containerd://1.6.20",
                                 "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": KUBELET_VERSION,
                                 "operatingSystem": "linux", "architecture": "amd64"},
                },
            }
            return copy.deepcopy(self._store(RESOURCES["nodes"], obj))

    @staticmethod
    def _ready_condition(ready: bool) -> dict:
        now = _now()
        return {"type": "Ready", "status": "True" if ready else "False",
                "reason": "KubeletReady" if ready else "KubeletNotReady",
                "message": "kubelet is posting ready status" if ready else "kubelet stopped posting node status",
                "lastHeartbeatTime": now, "lastTransitionTime": now}

    def add_daemonset(self, name: str, namespace: str = "kube-system") -> dict:
        with self.lock:
            existing = self.objects.get(("daemonsets", namespace, name))
            if existing:
                return copy.deepcopy(existing)
            obj = {"apiVersion": "apps/v1", "kind": "DaemonSet",
                   "metadata": self._new_meta(name, namespace, generation=1),
                   "spec": {"selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}},
                                         "spec": {"containers": [{"name": name, "image": f"registry.local/{name}:1"}]}}},
                   "status": {"currentNumberScheduled": 0, "desiredNumberScheduled": 0, "numberMisscheduled": 0,
                              "numberReady": 0, "observedGeneration": 1}}
            return copy.deepcopy(self._store(RESOURCES["daemonsets"], obj))

    def add_pod(self, name: str, *, namespace: str = "default", node: str | None = None,
                phase: str | None = None, requests: dict | None = None, labels: dict | None = None,
                node_selector: dict | None = None, tolerations: list | None = None,
                owner: str | None = "ReplicaSet/auto", annotations: dict | None = None,
                unschedulable: bool = False, gpus: int = 0) -> dict:
        """A pod. `owner` is "Kind/name" of its controller (None: a bare pod; "ReplicaSet/auto":
        a ReplicaSet named after the pod). A pod on a node is Running unless `phase` says otherwise;
        a pod without a node is Pending, and `unschedulable=True` records that the scheduler
        already tried (PodScheduled=False, reason Unschedulable), as `schedule()` would."""
        with self.lock:
            owners = []
            if owner:
                kind, oname = owner.split("/", 1)
                if oname == "auto":
                    oname = name.rsplit("-", 1)[0] if "-" in name else name + "-rs"
                if kind == "DaemonSet":
                    ds = self.add_daemonset(oname, namespace)
                    uid = ds["metadata"]["uid"]
                else:
                    uid = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{namespace}/{kind}/{oname}"))
                owners = [{"apiVersion": "apps/v1", "kind": kind, "name": oname, "uid": uid,
                           "controller": True, "blockOwnerDeletion": True}]
            res_requests = dict(requests or {"cpu": "100m", "memory": "128Mi"})
            if gpus:
                res_requests["nvidia.com/gpu"] = str(gpus)
            spec: dict = {
                "containers": [{"name": "main", "image": "registry.local/app:1",
                                "resources": {"requests": res_requests},
                                "terminationMessagePath": "/dev/termination-log",
                                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
                "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                "serviceAccountName": "default", "serviceAccount": "default", "schedulerName": "default-scheduler",
                "securityContext": {}, "priority": 0, "enableServiceLinks": True,
                "preemptionPolicy": "PreemptLowerPriority",
                "tolerations": tolerations if tolerations is not None else [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": 300}],
            }
            if node_selector:
                spec["nodeSelector"] = dict(node_selector)
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": self._new_meta(name, namespace, labels=labels or {"app": owners[0]["name"] if owners else name},
                                              annotations=annotations, ownerReferences=owners),
                   "spec": spec, "status": {"phase": "Pending", "qosClass": "Burstable"}}
            if node:
                if ("nodes", "", node) not in self.objects:
                    raise KeyError(f"no node {node}")
                self._bind(pod, self.objects[("nodes", "", node)])
                if phase:
                    pod["status"]["phase"] = phase
                    if phase in ("Succeeded", "Failed"):
                        pod["status"]["conditions"] = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
            else:
                if phase not in (None, "Pending"):
                    raise ValueError("a pod without a node can only be Pending")
                if unschedulable:
                    pod["status"]["conditions"] = [self._unschedulable_condition("0/0 nodes are available.")]
            self._store(RESOURCES["pods"], pod)
            self._refresh_pdbs()
            return copy.deepcopy(pod)

    def add_pdb(self, name: str, *, namespace: str = "default", match_labels: dict,
                min_available: int | str | None = None, max_unavailable: int | str | None = None) -> dict:
        if (min_available is None) == (max_unavailable is None):
            raise ValueError("give exactly one of min_available, max_unavailable")
        spec: dict = {"selector": {"matchLabels": dict(match_labels)}}
        if min_available is not None:
            spec["minAvailable"] = min_available
        else:
            spec["maxUnavailable"] = max_unavailable
        with self.lock:
            obj = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                   "metadata": self._new_meta(name, namespace, generation=1), "spec": spec, "status": {}}
            self._store(RESOURCES["poddisruptionbudgets"], obj)
            self._refresh_pdbs()
            return copy.deepcopy(self.objects[("poddisruptionbudgets", namespace, name)])

    def load(self, state: dict) -> None:
        """Build the state from a mapping {nodes: [...], pods: [...], pdbs: [...]} whose items
        are the keyword arguments of add_node / add_pod / add_pdb (plus `name`)."""
        for n in state.get("nodes") or []:
            self.add_node(**n)
        for p in state.get("pods") or []:
            self.add_pod(**p)
        for b in state.get("pdbs") or []:
            self.add_pdb(**b)

    # -- simulated controllers -----------------------------------------------------

    def set_node_ready(self, name: str, ready: bool) -> None:
        """The kubelet starts (Ready) or stops posting status (NotReady)."""
        with self.lock:
            node = self.objects[("nodes", "", name)]
            cond = _condition(node, "Ready")
            if (cond["status"] == "True") != ready:
                node["status"]["conditions"] = [c for c in node["status"]["conditions"] if c["type"] != "Ready"]
                node["status"]["conditions"].append(self._ready_condition(ready))
                self._store(RESOURCES["nodes"], node)

    def modify(self, plural: str, namespace: str | None, name: str, change) -> dict:
        """Another client's write: change(obj) edits the stored object in place; the
        resourceVersion moves on, as for any write."""
        with self.lock:
            obj = self.objects[(plural, namespace or "", name)]
            change(obj)
            self._store(RESOURCES[plural], obj)
            self._refresh_pdbs()
            return copy.deepcopy(obj)

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        with self.lock:
            pod = self.objects[("pods", namespace, name)]
            pod["status"]["phase"] = phase
            if phase in ("Succeeded", "Failed"):
                for c in pod["status"].get("conditions") or []:
                    if c["type"] in ("Ready", "ContainersReady"):
                        c["status"] = "False"
            self._store(RESOURCES["pods"], pod)
            self._refresh_pdbs()

    def _node_fits(self, pod: dict, node: dict, used: dict[str, dict[str, int]]) -> str | None:
        """None when the pod fits on the node, else the scheduler's reason."""
        labels = node["metadata"].get("labels") or {}
        if _condition(node, "Ready")["status"] != "True":
            return "node(s) had taint {node.kubernetes.io/not-ready: }, that the pod didn't tolerate"
        if node["spec"].get("unschedulable"):
            return "node(s) were unschedulable"
        if labels.get(self.label_key) != "k8s":
            return f"node(s) were not labelled {self.label_key}=k8s"
        if any(labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
            return "node(s) didn't match Pod's node affinity/selector"
        for taint in node["spec"].get("taints") or []:
            if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
                    _tolerates(t, taint) for t in pod["spec"].get("tolerations") or []):
                return f"node(s) had taint {{{taint['key']}: {taint.get('value', '')}}}, that the pod didn't tolerate"
        need = _pod_requests(pod)
        have = node["status"]["allocatable"]
        use = used.get(node["metadata"]["name"], {})
        for res_name, amount in need.items():
            cap = have.get(res_name)
            cap = 0 if cap is None else (_cpu_m(cap) if res_name == "cpu" else _bytes(cap))
            if use.get(res_name, 0) + amount > cap:
                return f"Insufficient {res_name}"
        return None

    def _bind(self, pod: dict, node: dict) -> None:
        now = _now()
        pod["spec"]["nodeName"] = node["metadata"]["name"]
        ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
        pod["status"] = {
            "phase": "Running", "qosClass": "Burstable", "hostIP": ip, "podIP": f"10.244.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}",
            "startTime": now,
            "conditions": [{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
                           for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "containerStatuses": [{"name": c["name"], "ready": True, "restartCount": 0, "started": True,
                                   "image": c["image"], "imageID": "", "containerID": "containerd://" + uuid.uuid4().hex,
                                   "state": {"running": {"startedAt": now}}, "lastState": {}}
                                  for c in pod["spec"]["containers"]],
        }

    @staticmethod
    def _unschedulable_condition(message: str) -> dict:
        return {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                "lastProbeTime": None, "lastTransitionTime": _now()}

    def schedule(self) -> list[tuple[str, str]]:
        """One scheduler pass: bind each pending pod to the first node (by name) that is Ready,
        schedulable, labelled sched=k8s, matches its nodeSelector, whose taints it tolerates and
        that has room; otherwise mark it Unschedulable with the reasons. Returns the bindings
        as ("namespace/name", node)."""
        bound = []
        with self.lock:
            nodes = sorted((o for k, o in self.objects.items() if k[0] == "nodes"), key=lambda n: n["metadata"]["name"])
            used: dict[str, dict[str, int]] = {}
            for (p, _, _), pod in self.objects.items():
                if p == "pods" and pod["spec"].get("nodeName") and pod["status"].get("phase") not in ("Succeeded", "Failed"):
                    u = used.setdefault(pod["spec"]["nodeName"], {})
                    for k, v in _pod_requests(pod).items():
                        u[k] = u.get(k, 0) + v
            pending = sorted((o for k, o in self.objects.items() if k[0] == "pods" and not o["spec"].get("nodeName")
                              and o["status"].get("phase") == "Pending" and not o["metadata"].get("deletionTimestamp")),
                             key=lambda o: (o["metadata"]["creationTimestamp"], o["metadata"]["name"]))
            for pod in pending:
                reasons: dict[str, int] = {}
                for node in nodes:
                    why = self._node_fits(pod, node, used)
                    if why is None:
                        self._bind(pod, node)
                        u = used.setdefault(node["metadata"]["name"], {})
                        for k, v in _pod_requests(pod).items():
                            u[k] = u.get(k, 0) + v
                        self._store(RESOURCES["pods"], pod)
                        bound.append((f"{pod['metadata']['namespace']}/{pod['metadata']['name']}", node["metadata"]["name"]))
                        break
                    reasons[why] = reasons.get(why, 0) + 1
                else:
                    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
                    msg = f"0/{len(nodes)} nodes are available" + (f": {detail}." if detail else ".")
                    old = _condition(pod, "PodScheduled")
                    if not old or old.get("message") != msg or old.get("status") != "False":
                        pod["status"]["conditions"] = [self._unschedulable_condition(msg)]
                        self._store(RESOURCES["pods"], pod)
            self._refresh_pdbs()
        return bound

    def _refresh_pdbs(self) -> None:
        """The disruption controller: recompute every PDB's status from the pods it selects."""
        for key, pdb in list(self.objects.items()):
            if key[0] != "poddisruptionbudgets":
                continue
            ns = key[1]
            pods = [p for (k, pns, _), p in self.objects.items() if k == "pods" and pns == ns
                    and selector_matches(pdb["spec"].get("selector"), p["metadata"].get("labels") or {})
                    and p["status"].get("phase") not in ("Succeeded", "Failed")]
            healthy = sum(1 for p in pods if p["status"].get("phase") == "Running"
                          and (_condition(p, "Ready") or {}).get("status") == "True"
                          and not p["metadata"].get("deletionTimestamp"))
            expected = len(pods)
            if "minAvailable" in pdb["spec"]:
                desired = _pdb_int(pdb["spec"]["minAvailable"], expected, round_up=True)
            else:
                desired = expected - _pdb_int(pdb["spec"]["maxUnavailable"], expected, round_up=True)
            status = {"observedGeneration": pdb["metadata"].get("generation", 1), "currentHealthy": healthy,
                      "desiredHealthy": max(desired, 0), "expectedPods": expected,
                      "disruptionsAllowed": max(0, healthy - max(desired, 0))}
            if pdb.get("status") != status:
                pdb["status"] = status
                self._store(RESOURCES["poddisruptionbudgets"], pdb)

    # -- API operations (called by the HTTP handler) ----------------------------------------

    def list(self, res: Res, ns: str | None, labels: str, fields: str) -> tuple[list[dict], str]:
        lreqs, freqs = parse_label_selector(labels), parse_field_selector(fields, res)
        with self.lock:
            out = [copy.deepcopy(o) for (p, ons, _), o in sorted(self.objects.items())
                   if p == res.plural and (ns is None or ons == ns)
                   and labels_match(lreqs, o["metadata"].get("labels") or {}) and fields_match(freqs, o)]
            return out, str(self.rv)

    def read(self, res: Res, ns: str | None, name: str) -> dict:
        obj = self.get(res.plural, ns, name)
        if obj is None:
            raise not_found(res, name)
        return obj

    def update(self, res: Res, ns: str | None, name: str, new: dict, dry_run: bool,
               precondition_rv: str | None) -> dict:
        """The common end of PUT and PATCH: validate, check the resourceVersion, store."""
        with self.lock:
            old = self.read(res, ns, name)
            if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
                raise bad_request("Object 'metadata' is missing or not an object")
            meta = new["metadata"]
            if meta.get("name") != name:
                raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})")
            if res.namespaced and meta.get("namespace", ns) != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            if new.get("kind", res.kind) != res.kind:
                raise bad_request(f"the kind of the object ({new.get('kind')}) does not match {res.kind}")
            if meta.get("uid", old["metadata"]["uid"]) != old["metadata"]["uid"]:
                raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {meta.get('uid')}, "
                               f"UID in object meta: {old['metadata']['uid']}", {"name": name, "kind": res.plural})
            rv = precondition_rv if precondition_rv is not None else meta.get("resourceVersion")
            if rv not in (None, "") and rv != old["metadata"]["resourceVersion"]:
                raise conflict(res, name)
            _check_types(res, new)
            for field in ("labels", "annotations"):
                for k, v in (meta.get(field) or {}).items():
                    if not _LABEL_KEY.match(k) or len(k.rsplit("/", 1)[-1]) > 63:
                        raise invalid(res, name, f"metadata.{field}", k, "name part must consist of alphanumeric "
                                      "characters, '-', '_' or '.', and must start and end with an alphanumeric character")
                    if field == "labels" and (not _LABEL_VALUE.match(v) or len(v) > 63):
                        raise invalid(res, name, "metadata.labels", v, "a valid label must be an empty string or "
                                      "consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                                      "with an alphanumeric character")
            # Server-owned fields come from the stored object; status is a subresource (the main
            # resource ignores changes to it), and most of a pod's spec is immutable.
            new = copy.deepcopy(new)
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
            for k in ("uid", "creationTimestamp", "resourceVersion", "namespace"):
                if k in old["metadata"]:
                    new["metadata"][k] = old["metadata"][k]
            if "status" in old:
                new["status"] = old["status"]
            if res.plural == "pods":
                mutable = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")

                def strip(spec: dict) -> dict:
                    out = {k: v for k, v in spec.items() if k not in mutable}
                    for key in ("containers", "initContainers"):
                        if isinstance(out.get(key), list):
                            out[key] = [{k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c
                                        for c in out[key]]
                    return out
                if strip(new.get("spec") or {}) != strip(old["spec"]):
                    raise invalid(res, name, "spec", "", "Forbidden: pod updates may not change fields other than "
                                  "`spec.containers[*].image`, `spec.initContainers[*].image`, "
                                  "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing "
                                  "tolerations) or `spec.terminationGracePeriodSeconds`")
            if new == old:
                return old  # a no-op write does not bump the resourceVersion
            if dry_run:
                return new
            stored = self._store(res, new)
            self._refresh_pdbs()
            return copy.deepcopy(stored)

    def patch(self, res: Res, ns: str | None, name: str, ctype: str, body: Any, dry_run: bool) -> dict:
        with self.lock:
            old = self.read(res, ns, name)
            try:
                if ctype == "application/json-patch+json":
                    new = json_patch(old, body)
                elif not isinstance(body, dict):
                    raise PatchError("json: cannot unmarshal array into Go value of type map[string]interface {}", 400)
                elif ctype == "application/merge-patch+json":
                    new = merge_patch(old, body)
                else:
                    new = strategic_merge_patch(old, body)
            except PatchError as exc:
                if exc.code == 400:
                    raise bad_request(str(exc)) from None
                raise ApiError(422, "Invalid", str(exc)) from None
            # A resourceVersion in the patch is a precondition, as on the real server.
            patched_rv = (new.get("metadata") or {}).get("resourceVersion") if isinstance(new, dict) else None
            if patched_rv != old["metadata"]["resourceVersion"] and patched_rv not in (None, ""):
                raise conflict(res, name)
            return self.update(res, ns, name, new, dry_run, None)

    def delete(self, res: Res, ns: str | None, name: str, options: dict, dry_run: bool) -> dict:
        with self.lock:
            old = self.read(res, ns, name)
            pre = options.get("preconditions") or {}
            if pre.get("uid") not in (None, old["metadata"]["uid"]):
                raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, "
                               f"UID in object meta: {old['metadata']['uid']}", {"name": name, "kind": res.plural})
            if pre.get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]):
                raise conflict(res, name)
            if not dry_run:
                self.rv += 1
                del self.objects[self._key(res, ns, name)]
                self._refresh_pdbs()
            return old

    def evict(self, ns: str, name: str, body: Any, dry_run: bool) -> dict:
        if not isinstance(body, dict) or body.get("kind") != "Eviction" or \
                body.get("apiVersion") not in ("policy/v1", "policy/v1beta1"):
            raise bad_request("the body of an eviction must be a policy/v1 or policy/v1beta1 Eviction, got "
                              f"{body.get('apiVersion') if isinstance(body, dict) else type(body).__name__}/"
                              f"{body.get('kind') if isinstance(body, dict) else ''}")
        meta = body.get("metadata") or {}
        if meta.get("name") != name:
            raise bad_request("name in URL does not match name in Eviction object")
        pods = RESOURCES["pods"]
        with self.lock:
            pod = self.read(pods, ns, name)
            options = body.get("deleteOptions") or {}
            phase = pod["status"].get("phase")
            if phase not in ("Succeeded", "Failed", "Pending") and not pod["metadata"].get("deletionTimestamp"):
                pdbs = [p for (k, pns, _), p in self.objects.items() if k == "poddisruptionbudgets" and pns == ns
                        and selector_matches(p["spec"].get("selector"), pod["metadata"].get("labels") or {})]
                if len(pdbs) > 1:
                    raise ApiError(500, "InternalError", "This pod has more than one PodDisruptionBudget, which the "
                                   "eviction subresource does not support.")
                if pdbs:
                    pdb = pdbs[0]
                    st = pdb["status"]
                    if st.get("disruptionsAllowed", 0) <= 0:
                        raise ApiError(429, "TooManyRequests",
                                       "Cannot evict pod as it would violate the pod's disruption budget.",
                                       {"causes": [{"reason": "DisruptionBudget", "message":
                                                    f"The disruption budget {pdb['metadata']['name']} needs "
                                                    f"{st.get('desiredHealthy', 0)} healthy pods and has "
                                                    f"{st.get('currentHealthy', 0)} currently"}]})
                    if not dry_run:
                        st["disruptionsAllowed"] -= 1
                        self._store(RESOURCES["poddisruptionbudgets"], pdb)
            self.delete(pods, ns, name, options, dry_run)
            if not dry_run and self.respawn:
                self._respawn(pod)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _respawn(self, pod: dict) -> None:
        """The ReplicaSet controller replaces an evicted pod with a new, Pending one."""
        owner = _controller(pod)
        if not owner or owner["kind"] not in ("ReplicaSet", "StatefulSet", "Job"):
            return
        meta = pod["metadata"]
        name = meta["name"] if owner["kind"] == "StatefulSet" else f"{owner['name']}-{secrets.token_hex(3)[:5]}"
        new = {"apiVersion": "v1", "kind": "Pod",
               "metadata": self._new_meta(name, meta["namespace"], labels=meta.get("labels"),
                                          annotations=meta.get("annotations"), ownerReferences=meta.get("ownerReferences")),
               "spec": {k: v for k, v in copy.deepcopy(pod["spec"]).items() if k != "nodeName"},
               "status": {"phase": "Pending", "qosClass": pod["status"].get("qosClass", "Burstable")}}
        self._store(RESOURCES["pods"], new)
        self._refresh_pdbs()


def _tolerates(tol: dict, taint: dict) -> bool:
    if tol.get("effect") and tol["effect"] != taint.get("effect"):
        return False
    if tol.get("operator") == "Exists":
        return not tol.get("key") or tol["key"] == taint["key"]
    return tol.get("key") == taint["key"] and tol.get("value", "") == taint.get("value", "")


def _check_types(res: Res, obj: dict) -> None:
    """What the real server's JSON decoder rejects (400), for the fields used here."""
    meta = obj["metadata"]
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and (not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values())):
            raise bad_request(f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{field} "
                              "of type map[string]string")
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise bad_request(f"json: cannot unmarshal into Go struct field {res.kind}.spec")
    if res.plural == "nodes" and spec and "unschedulable" in spec and not isinstance(spec["unschedulable"], bool):
        raise bad_request("json: cannot unmarshal into Go struct field NodeSpec.spec.unschedulable of type bool")
    if res.plural == "nodes" and spec and "taints" in spec and not isinstance(spec["taints"], list):
        raise bad_request("json: cannot unmarshal into Go struct field NodeSpec.spec.taints of type []v1.Taint")


# --------------------------------------------------------------------------- Table output

def _node_status(node: dict) -> str:
    cond = _condition(node, "Ready")
    s = {"True": "Ready", "False": "NotReady"}.get((cond or {}).get("status"), "Unknown")
    return s + (",SchedulingDisabled" if node["spec"].get("unschedulable") else "")


def _table_columns(res: Res) -> list[tuple[str, str, int, Any]]:
    """(name, format, priority, cell function), as the real server's printers."""
    name_col = ("Name", "name", 0, lambda o: o["metadata"]["name"])
    age_col = ("Age", "", 0, lambda o: _age(o["metadata"].get("creationTimestamp")))
    if res.plural == "nodes":
        def roles(o):
            r = sorted(k.split("/", 1)[1] for k in o["metadata"].get("labels") or {}
                       if k.startswith("node-role.kubernetes.io/"))
            return ",".join(r) or "<none>"

        def addr(kind):
            return lambda o: next((a["address"] for a in o["status"].get("addresses") or [] if a["type"] == kind), "<none>")
        info = lambda k: lambda o: o["status"].get("nodeInfo", {}).get(k, "")  # noqa: E731
        return [name_col, ("Status", "", 0, _node_status), ("Roles", "", 0, roles), age_col,
                ("Version", "", 0, info("kubeletVersion")), ("Internal-IP", "", 1, addr("InternalIP")),
                ("External-IP", "", 1, addr("ExternalIP")), ("OS-Image", "", 1, info("osImage")),
                ("Kernel-Version", "", 1, info("kernelVersion")),
                ("Container-Runtime", "", 1, info("containerRuntimeVersion"))]
    if res.plural == "pods":
        def ready(o):
            cs = o["status"].get("containerStatuses") or []
            return f"{sum(1 for c in cs if c.get('ready'))}/{len(o['spec'].get('containers') or [])}"

        def status(o):
            if o["metadata"].get("deletionTimestamp"):
                return "Terminating"
            return o["status"].get("reason") or o["status"].get("phase", "Unknown")
        return [name_col, ("Ready", "", 0, ready), ("Status", "", 0, status),
                ("Restarts", "", 0, lambda o: sum(c.get("restartCount", 0) for c in o["status"].get("containerStatuses") or [])),
                age_col, ("IP", "", 1, lambda o: o["status"].get("podIP", "<none>")),
                ("Node", "", 1, lambda o: o["spec"].get("nodeName", "<none>")),
                ("Nominated Node", "", 1, lambda o: o["status"].get("nominatedNodeName", "<none>")),
                ("Readiness Gates", "", 1, lambda o: "<none>")]
    if res.plural == "poddisruptionbudgets":
        return [name_col, ("Min Available", "", 0, lambda o: str(o["spec"].get("minAvailable", "N/A"))),
                ("Max Unavailable", "", 0, lambda o: str(o["spec"].get("maxUnavailable", "N/A"))),
                ("Allowed Disruptions", "", 0, lambda o: o["status"].get("disruptionsAllowed", 0)), age_col]
    return [name_col, age_col]


def to_table(res: Res, objs: list[dict], include: str, rv: str) -> dict:
    cols = _table_columns(res)
    rows = []
    for o in objs:
        row: dict = {"cells": [f(o) for _, _, _, f in cols]}
        if include == "Object":
            row["object"] = o
        elif include == "Metadata":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
            "columnDefinitions": [{"name": n, "type": "integer" if n == "Restarts" else "string", "format": fmt,
                                   "description": n, "priority": pr} for n, fmt, pr, _ in cols],
            "rows": rows}


def _wants_table(accept: str) -> bool | None:
    """True: a Table; False: plain JSON; None: nothing we can produce (406)."""
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype, params = parts[0].lower(), dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        if mtype in ("application/json", "application/*", "*/*"):
            if params.get("as") == "Table":
                if params.get("g") == "meta.k8s.io" and params.get("v") in ("v1", "v1beta1"):
                    return True
                continue  # a Table version we do not serve: try the next media range
            if params.get("as"):
                continue
            return False
    return None


# --------------------------------------------------------------------------- HTTP

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-apiserver-test"
    timeout = 60  # an idle keep-alive connection is closed after this
    api: "KubeApiServer"

    def log_message(self, fmt, *args):  # quiet; requests are recorded in api.requests instead
        pass

    def setup(self):
        super().setup()
        self.api.connections.add(self.connection)

    def finish(self):
        self.api.connections.discard(self.connection)
        super().finish()

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, body: dict | str, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method: str) -> None:
        body = self._read_body()
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        entry = {"method": method, "path": url.path, "query": query, "content_type": ctype,
                 "accept": self.headers.get("Accept", ""), "user_agent": self.headers.get("User-Agent", ""),
                 "body": body.decode(errors="replace")}
        try:
            for hook in list(self.api.hooks):
                hook(entry)
            if self.api.failure is not None and self.api.failure[1](entry):
                code = self.api.failure[0]
                raise ApiError(code, {500: "InternalError", 503: "ServiceUnavailable"}.get(code, "InternalError"),
                               "Internal error occurred: etcdserver: request timed out" if code == 500 else
                               "the server is currently unable to handle the request")
            auth = self.headers.get("Authorization", "")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.api.token}".encode()):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            code, out = self.api.route(method, url.path, query, ctype, body, self.headers.get("Accept") or "*/*")
        except ApiError as exc:
            code, out = exc.code, exc.status()
        except Exception as exc:  # a bug in the test server: say so, as a real 500 would
            code, out = 500, ApiError(500, "InternalError", f"test apiserver bug: {exc!r}").status()
        entry["status"] = code
        self.api.record(entry)
        if isinstance(out, str):
            self._send(code, out, "text/plain; charset=utf-8")
        else:
            self._send(code, out)


class _HTTPServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that gives up mid-handshake (unknown CA, timeout) is not a server failure:
        # no traceback on stderr. Bugs in request handling become 500 Status answers instead.
        pass


class KubeApiServer:
    """The HTTP(S) front of a Cluster. start() binds 127.0.0.1 (a free port unless given)."""

    def __init__(self, *, port: int = 0, token: str | None = None, tls: bool = True,
                 folder: str | Path | None = None, cluster: Cluster | None = None):
        self.cluster = cluster or Cluster()
        self.token = token or secrets.token_urlsafe(24)
        self.tls = tls
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kube-apiserver-")
            folder = self._tmp.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.failure: tuple[int, Any] | None = None  # (status, which requests)
        self.hooks: list = []  # callables(entry) run before each request is served
        self.kubeconfig: Path | None = None  # set by whoever writes the main kubeconfig
        self.requests: list[dict] = []
        self.connections: set[socket.socket] = set()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ssl: ssl.SSLContext | None = None
        self.ca_pem = b""
        if tls:
            cert, key, self.ca_pem = _make_tls(self.folder)
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(cert, key)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "KubeApiServer":
        handler = type("Handler", (_Handler,), {"api": self})
        httpd = _HTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        if self._ssl:
            # Handshake in the handler thread (on first read), not in the accept loop.
            httpd.socket = self._ssl.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"kube-apiserver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self.connections):  # keep-alive connections would go on being served
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    @contextmanager
    def down(self):
        """The API server is down (connection refused) inside the block, back up after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @contextmanager
    def failing(self, status: int = 500, when=None):
        """Inside the block, requests are answered with `status` (a Status object): all of them,
        or those for which when(entry) is true (entry: method, path, query, ...)."""
        self.failure = (status, when or (lambda entry: True))
        try:
            yield
        finally:
            self.failure = None

    def record(self, entry: dict) -> None:
        with self.cluster.lock:
            self.requests.append(entry)

    def writes(self) -> list[dict]:
        """Requests that could have changed state and were accepted."""
        return [r for r in self.requests if r["method"] != "GET" and r["status"] < 300]

    def reset(self) -> None:
        """An empty cluster, no failure injected, request log cleared (between tests)."""
        self.cluster.reset()
        self.failure = None
        self.hooks.clear()
        self.requests.clear()

    def write_kubeconfig(self, path: str | Path, token: str | None = None, context: str = "test") -> Path:
        path = Path(path)
        cluster: dict = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        cfg = {"apiVersion": "v1", "kind": "Config", "preferences": {},
               "clusters": [{"name": context, "cluster": cluster}],
               "users": [{"name": f"{context}-admin", "user": {"token": token or self.token}}],
               "contexts": [{"name": context, "context": {"cluster": context, "user": f"{context}-admin",
                                                          "namespace": "default"}}],
               "current-context": context}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)
        return path

    # -- pass-throughs to the cluster, for tests ------------------------------------

    def __getattr__(self, name):
        # add_node, add_pod, add_pdb, add_daemonset, schedule, set_node_ready, set_pod_phase, get, items
        if name in ("add_node", "add_pod", "add_pdb", "add_daemonset", "schedule", "set_node_ready",
                    "set_pod_phase", "get", "items", "load", "modify"):
            return getattr(self.cluster, name)
        raise AttributeError(name)

    def node(self, name: str) -> dict | None:
        return self.cluster.get("nodes", None, name)

    def pod(self, name: str, namespace: str = "default") -> dict | None:
        return self.cluster.get("pods", namespace, name)

    def pods(self, node: str | None = None) -> list[dict]:
        return [p for p in self.cluster.items("pods") if node is None or p["spec"].get("nodeName") == node]

    # -- routing ---------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict, ctype: str, body: bytes, accept: str):
        parts = [p for p in path.split("/") if p]
        if method == "GET" and len(parts) == 1 and parts[0] in ("healthz", "livez", "readyz"):
            return 200, "ok"
        if method == "GET" and parts == ["version"]:
            return 200, SERVER_VERSION
        if method == "GET" and parts == ["api"]:
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]}
        if method == "GET" and parts == ["apis"]:
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in GROUPS]}
        if method == "GET" and len(parts) == 2 and parts[0] == "apis" and parts[1] in GROUPS:
            return 200, {"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1])}
        if method == "GET" and (parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis"
                                                           and parts[2] in GROUPS.get(parts[1], ()))):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            return 200, _resource_list(group, version)
        # /api/v1/... or /apis/GROUP/VERSION/...
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis" and parts[2] in GROUPS.get(parts[1], ()):
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in RESOURCES or RESOURCES[rest[0]].group != group \
                or version not in RESOURCES[rest[0]].versions or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        res = RESOURCES[rest[0]]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if ns is not None and not res.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.namespaced and name is not None and ns is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        dry = query.get("dryRun")
        if dry not in (None, "All"):
            raise bad_request(f"Invalid dry run value: {dry!r}; only 'All' is supported")
        dry_run = dry == "All"

        if method in ("POST", "PUT") and ctype not in ("", "application/json"):
            # The real server also reads YAML and protobuf; this one only JSON (no Content-Type
            # means JSON there too).
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json")
        if sub is not None:
            if res.plural == "pods" and sub == "eviction" and method == "POST":
                return 201, self.cluster.evict(ns, name, _json(body), dry_run)
            if res.plural == "pods" and sub == "eviction":
                raise _method_not_allowed(method)
            raise ApiError(404, "NotFound", "the server could not find the requested resource")

        verb = {"GET": "get" if name else "list", "PUT": "update", "PATCH": "patch", "DELETE": "delete",
                "POST": "create"}[method]
        if verb not in res.verbs or (name is None and verb not in ("list", "create")) or (name and verb == "create"):
            raise _method_not_allowed(method)
        if verb in ("get", "list"):
            if query.get("watch") in ("true", "1"):
                raise ApiError(405, "MethodNotAllowed", "watch is not supported by this test API server; poll instead")
            table = _wants_table(accept)
            if table is None:
                raise ApiError(406, "NotAcceptable", f"only the following media types are accepted: application/json, "
                               f"application/json;as=Table;v=v1;g=meta.k8s.io (asked for {accept})")
            include = query.get("includeObject", "Metadata" if table else None)
            if include not in (None, "None", "Metadata", "Object"):
                raise bad_request(f"includeObject: unsupported value {include!r}")
            av = api_version(res, version)
            if verb == "get":
                obj = _versioned(self.cluster.read(res, ns, name), av)
                return 200, to_table(res, [obj], include, obj["metadata"]["resourceVersion"]) if table else obj
            items, rv = self.cluster.list(res, ns, query.get("labelSelector", ""), query.get("fieldSelector", ""))
            meta: dict = {"resourceVersion": rv}
            limit = query.get("limit")
            if limit:
                if not limit.isdigit():
                    raise bad_request(f"limit: invalid value {limit!r}")
                start = 0
                if query.get("continue"):
                    try:
                        start = int(base64.urlsafe_b64decode(query["continue"]).decode())
                    except Exception:
                        raise ApiError(410, "Expired", "The provided continue parameter is too old") from None
                end = start + int(limit) if int(limit) else len(items)
                if end < len(items):
                    meta["continue"] = base64.urlsafe_b64encode(str(end).encode()).decode()
                    meta["remainingItemCount"] = len(items) - end
                items = items[start:end]
            if table:
                return 200, to_table(res, [_versioned(i, av) for i in items], include, rv)
            for i in items:  # list items carry no kind/apiVersion, as on the real server
                i.pop("kind", None)
                i.pop("apiVersion", None)
            return 200, {"kind": f"{res.kind}List", "apiVersion": av, "metadata": meta, "items": items}
        if verb == "patch":
            if ctype not in PATCH_TYPES:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types include: "
                               f"{', '.join(PATCH_TYPES)}")
            return 200, self.cluster.patch(res, ns, name, ctype, _json(body), dry_run)
        if verb == "update":
            obj = _json(body)
            return 200, self.cluster.update(res, ns, name, obj, dry_run, None)
        if verb == "delete":
            options = _json(body) if body else {}
            old = self.cluster.delete(res, ns, name, options if isinstance(options, dict) else {}, dry_run)
            if res.plural == "pods":
                return 200, old
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "kind": res.plural, "uid": old["metadata"]["uid"]}}
        raise _method_not_allowed(method)


def _method_not_allowed(method: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise bad_request(f"the body of the request is not valid JSON: {exc}") from None


def _versioned(obj: dict, av: str) -> dict:
    obj["apiVersion"] = av
    return obj


def _group(name: str) -> dict:
    versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in GROUPS[name]]
    return {"name": name, "versions": versions, "preferredVersion": versions[0]}


def _resource_list(group: str, version: str) -> dict:
    gv = f"{group}/{version}" if group else version
    resources = []
    for r in _resources_for(group, version):
        item = {"name": r.plural, "singularName": "", "namespaced": r.namespaced, "kind": r.kind,
                "verbs": list(r.verbs)}
        if r.short:
            item["shortNames"] = r.short
        resources.append(item)
        if r.plural == "pods":
            resources.append({"name": "pods/eviction", "singularName": "", "namespaced": True, "group": "policy",
                              "version": "v1", "kind": "Eviction", "verbs": ["create"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}


# --------------------------------------------------------------------------- standalone

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kube_apiserver", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--state", help="YAML: {nodes: [...], pods: [...], pdbs: [...]} (add_node/add_pod/add_pdb args)")
    ap.add_argument("--kubeconfig", default="kubeconfig.yaml", help="where to write the kubeconfig (with the token)")
    ap.add_argument("--token", help="bearer token (default: random)")
    ap.add_argument("--no-tls", action="store_true", help="plain HTTP instead of HTTPS")
    ap.add_argument("--schedule-every", type=float, default=0, help="run the scheduler every N seconds (0: never)")
    args = ap.parse_args(argv)
    server = KubeApiServer(port=args.port, token=args.token, tls=not args.no_tls)
    if args.state:
        server.cluster.load(yaml.safe_load(Path(args.state).read_text()) or {})
    server.start()
    kc = server.write_kubeconfig(args.kubeconfig)
    print(f"kube test apiserver on {server.url}; kubeconfig {kc}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(args.schedule_every or 3600):
        if args.schedule_every:
            server.cluster.schedule()
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
