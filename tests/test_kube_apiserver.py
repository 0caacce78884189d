"""The test API server is strict like the real one: raw HTTPS requests, status codes, Status
objects. (kubectl and the adapter use it in test_kube_kubectl.py and test_kube_adapter.py.)"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import pytest
import yaml

from provisioner.clusters.kubernetes import KubernetesAdapter
from provisioner.config import KubernetesSettings
from tests.support import ROOT, free_port

pytestmark = pytest.mark.integration

MERGE, STRATEGIC, JSONPATCH = ("application/merge-patch+json", "application/strategic-merge-patch+json",
                               "application/json-patch+json")


def call(kube, method, path, body=None, ctype=None, token=None, accept="application/json"):
    ctx = ssl.create_default_context(cadata=kube.ca_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", kube.port, context=ctx, timeout=10)
    headers = {"Accept": accept}
    if token is not False:
        headers["Authorization"] = f"Bearer {token or kube.token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = ctype or "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if resp.headers.get("Content-Type", "").startswith("application/json") else raw
    finally:
        conn.close()


def assert_status(answer, code, reason):
    status, body = answer
    assert status == code, body
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == code and body["reason"] == reason
    return body


def test_bearer_token_is_required(kube):
    kube.add_node("sn01")
    assert_status(call(kube, "GET", "/api/v1/nodes", token=False), 401, "Unauthorized")
    assert_status(call(kube, "GET", "/api/v1/nodes", token="guess"), 401, "Unauthorized")
    status, body = call(kube, "GET", "/api/v1/nodes")
    assert status == 200 and body["kind"] == "NodeList" and [n["metadata"]["name"] for n in body["items"]] == ["sn01"]
    assert "kind" not in body["items"][0]  # list items carry no kind, as on the real server


def test_discovery_serves_what_kubectl_and_the_client_ask_for(kube):
    assert call(kube, "GET", "/version")[1]["major"] == "1"
    assert call(kube, "GET", "/api")[1]["versions"] == ["v1"]
    groups = {g["name"]: g for g in call(kube, "GET", "/apis")[1]["groups"]}
    assert [v["version"] for v in groups["policy"]["versions"]] == ["v1", "v1beta1"]
    core = {r["name"]: r for r in call(kube, "GET", "/api/v1")[1]["resources"]}
    assert core["pods/eviction"]["kind"] == "Eviction" and core["pods/eviction"]["group"] == "policy"
    assert "patch" in core["nodes"]["verbs"]
    for gv in ("apis/policy/v1", "apis/policy/v1beta1"):
        assert [r["name"] for r in call(kube, "GET", f"/{gv}")[1]["resources"]] == ["poddisruptionbudgets"]
    assert_status(call(kube, "GET", "/apis/batch/v1"), 404, "NotFound")


def test_patch_content_types(kube):
    kube.add_node("sn01", labels={"sched": "k8s"})
    path = "/api/v1/nodes/sn01"
    patch = {"metadata": {"labels": {"sched": "slurm"}}}
    assert_status(call(kube, "PATCH", path, patch, "application/json"), 415, "UnsupportedMediaType")
    assert_status(call(kube, "PATCH", path, patch, "application/apply-patch+yaml"), 415, "UnsupportedMediaType")
    assert_status(call(kube, "PATCH", path, patch, JSONPATCH), 400, "BadRequest")  # a map is not a JSON patch
    assert_status(call(kube, "PATCH", path, [patch], MERGE), 400, "BadRequest")

    assert call(kube, "PATCH", path, patch, MERGE)[1]["metadata"]["labels"]["sched"] == "slurm"
    status, node = call(kube, "PATCH", path, {"metadata": {"labels": {"sched": None}}, "spec": {"unschedulable": True}},
                        STRATEGIC)
    assert status == 200 and "sched" not in node["metadata"]["labels"] and node["spec"]["unschedulable"] is True
    ops = [{"op": "add", "path": "/metadata/labels/example.org~1role", "value": "k8s"},
           {"op": "test", "path": "/spec/unschedulable", "value": True},
           {"op": "remove", "path": "/spec/unschedulable"}]
    status, node = call(kube, "PATCH", path, ops, JSONPATCH)
    assert status == 200 and node["metadata"]["labels"]["example.org/role"] == "k8s" and "unschedulable" not in node["spec"]
    failed_test = [{"op": "test", "path": "/metadata/labels/example.org~1role", "value": "slurm"}]
    assert_status(call(kube, "PATCH", path, failed_test, JSONPATCH), 422, "Invalid")
    assert_status(call(kube, "PATCH", path, {"metadata": {"labels": {"sched": "no spaces"}}}, MERGE), 422, "Invalid")
    assert_status(call(kube, "PATCH", path, {"spec": {"unschedulable": "yes"}}, MERGE), 400, "BadRequest")


def test_resource_version_conflicts(kube):
    node = kube.add_node("sn01")
    path, rv = "/api/v1/nodes/sn01", node["metadata"]["resourceVersion"]
    status, after = call(kube, "PATCH", path, {"metadata": {"resourceVersion": rv, "labels": {"a": "1"}}}, MERGE)
    assert status == 200 and int(after["metadata"]["resourceVersion"]) > int(rv)
    body = assert_status(call(kube, "PATCH", path, {"metadata": {"resourceVersion": rv, "labels": {"a": "2"}}},
                              STRATEGIC), 409, "Conflict")
    assert "the object has been modified" in body["message"]
    stale = dict(node, metadata=dict(node["metadata"], labels={"b": "1"}))
    assert_status(call(kube, "PUT", path, stale), 409, "Conflict")
    fresh = dict(after, metadata=dict(after["metadata"], labels={"b": "1"}))
    status, put = call(kube, "PUT", path, fresh)
    assert status == 200 and put["metadata"]["labels"] == {"b": "1"}
    # A write that changes nothing keeps the resourceVersion.
    assert call(kube, "PATCH", path, {"metadata": {"labels": {"b": "1"}}}, MERGE)[1]["metadata"]["resourceVersion"] == \
        put["metadata"]["resourceVersion"]
    # The status is a subresource: the main resource ignores changes to it.
    status, ignored = call(kube, "PATCH", path, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
                           STRATEGIC)
    assert status == 200 and ignored["status"]["conditions"][0]["status"] == "True"


def test_label_and_field_selectors(kube):
    kube.add_node("sn01", labels={"sched": "k8s", "gpu": "a100"})
    kube.add_node("sn02", labels={"sched": "slurm"})
    kube.add_node("sn03", unschedulable=True)
    kube.add_pod("web-1", node="sn01")
    kube.add_pod("web-2")
    kube.add_pod("done-1", node="sn02", phase="Succeeded")

    def names(path):
        status, body = call(kube, "GET", path)
        assert status == 200, body
        return [i["metadata"]["name"] for i in body["items"]]

    assert names("/api/v1/nodes?labelSelector=sched%3Dk8s") == ["sn01"]
    assert names("/api/v1/nodes?labelSelector=sched%20in%20(k8s,slurm),!gpu") == ["sn02"]
    assert names("/api/v1/nodes?labelSelector=sched!%3Dslurm") == ["sn01", "sn03"]
    assert names("/api/v1/nodes?fieldSelector=spec.unschedulable%3Dtrue") == ["sn03"]
    assert names("/api/v1/nodes?fieldSelector=metadata.name%3Dsn02") == ["sn02"]
    assert names("/api/v1/pods?fieldSelector=spec.nodeName%3Dsn01") == ["web-1"]
    assert names("/api/v1/pods?fieldSelector=spec.nodeName%3D") == ["web-2"]
    assert names("/api/v1/pods?fieldSelector=status.phase!%3DSucceeded,status.phase!%3DFailed") == ["web-1", "web-2"]
    assert names("/api/v1/namespaces/other/pods") == []
    assert_status(call(kube, "GET", "/api/v1/pods?fieldSelector=spec.color%3Dblue"), 400, "BadRequest")
    assert_status(call(kube, "GET", "/api/v1/nodes?fieldSelector=spec.nodeName%3Dsn01"), 400, "BadRequest")
    assert_status(call(kube, "GET", "/api/v1/nodes?labelSelector=sched%3D%3D%3D"), 400, "BadRequest")

    first = call(kube, "GET", "/api/v1/nodes?limit=2")[1]
    assert len(first["items"]) == 2 and first["metadata"]["remainingItemCount"] == 1
    rest = call(kube, "GET", f"/api/v1/nodes?limit=2&continue={first['metadata']['continue']}")[1]
    assert [n["metadata"]["name"] for n in rest["items"]] == ["sn03"] and "continue" not in rest["metadata"]


def test_table_output_and_accept_negotiation(kube):
    kube.add_node("sn01", unschedulable=True)
    table_accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    status, body = call(kube, "GET", "/api/v1/nodes", accept=table_accept)
    assert status == 200 and body["kind"] == "Table"
    assert [c["name"] for c in body["columnDefinitions"] if c["priority"] == 0] == ["Name", "Status", "Roles", "Age",
                                                                                       "Version"]
    assert body["rows"][0]["cells"][:2] == ["sn01", "Ready,SchedulingDisabled"]
    assert body["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    assert call(kube, "GET", "/api/v1/nodes/sn01", accept=table_accept)[1]["kind"] == "Table"
    assert_status(call(kube, "GET", "/api/v1/nodes", accept="application/vnd.kubernetes.protobuf"), 406,
                  "NotAcceptable")
    assert_status(call(kube, "GET", "/api/v1/nodes?watch=true"), 405, "MethodNotAllowed")


def test_eviction_is_strict_and_honours_pod_disruption_budgets(kube):
    kube.add_node("sn01", labels={"sched": "k8s"})
    for i in range(3):
        kube.add_pod(f"db-{i}", node="sn01", labels={"app": "db"}, owner="StatefulSet/db")
    kube.add_pod("cache-0", node="sn01", labels={"app": "cache", "tier": "x"})
    kube.add_pdb("db", match_labels={"app": "db"}, min_available=2)
    kube.add_pdb("cache-a", match_labels={"app": "cache"}, max_unavailable=1)
    kube.add_pdb("cache-b", match_labels={"tier": "x"}, max_unavailable=1)

    def evict(name, api_version="policy/v1", kind="Eviction", body_name=None):
        body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": body_name or name, "namespace": "default"}}
        return call(kube, "POST", f"/api/v1/namespaces/default/pods/{name}/eviction", body)

    assert_status(evict("db-0", kind="Pod"), 400, "BadRequest")
    assert_status(evict("db-0", api_version="policy/v2"), 400, "BadRequest")
    assert_status(evict("db-0", body_name="db-1"), 400, "BadRequest")
    assert_status(evict("nope"), 404, "NotFound")
    assert_status(evict("cache-0"), 500, "InternalError")  # two PDBs: the real server refuses too

    assert evict("db-0", api_version="policy/v1beta1") == (201, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                                                  "status": "Success", "code": 201})
    assert kube.pod("db-0") is not None  # a StatefulSet pod comes back under the same name, Pending
    assert kube.pod("db-0")["status"]["phase"] == "Pending"
    body = assert_status(evict("db-1"), 429, "TooManyRequests")
    assert body["details"]["causes"][0]["reason"] == "DisruptionBudget"
    assert "needs 2 healthy pods and has 2 currently" in body["details"]["causes"][0]["message"]
    pdb = call(kube, "GET", "/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets/db")[1]
    assert pdb["apiVersion"] == "policy/v1beta1" and pdb["status"]["disruptionsAllowed"] == 0
    assert_status(call(kube, "GET", "/api/v1/namespaces/default/pods/db-1/eviction"), 405, "MethodNotAllowed")


def test_pod_spec_is_immutable_and_unknown_things_are_refused(kube):
    kube.add_node("sn01")
    kube.add_pod("web-1", node="sn01")
    path = "/api/v1/namespaces/default/pods/web-1"
    assert_status(call(kube, "PATCH", path, {"spec": {"nodeName": "sn02"}}, MERGE), 422, "Invalid")
    assert call(kube, "PATCH", path, {"metadata": {"labels": {"x": "y"}}}, MERGE)[0] == 200
    assert_status(call(kube, "GET", "/api/v1/nodes/nope"), 404, "NotFound")
    assert_status(call(kube, "GET", "/api/v1/pods/web-1"), 404, "NotFound")  # namespaced: needs the namespace
    assert_status(call(kube, "GET", "/api/v1/services"), 404, "NotFound")
    assert_status(call(kube, "POST", "/api/v1/nodes", {"metadata": {"name": "x"}}), 405, "MethodNotAllowed")
    assert_status(call(kube, "PATCH", "/api/v1/nodes/sn01?dryRun=Maybe", {}, MERGE), 400, "BadRequest")
    assert call(kube, "PATCH", "/api/v1/nodes/sn01?dryRun=All", {"metadata": {"labels": {"d": "1"}}}, MERGE)[0] == 200
    assert "d" not in kube.node("sn01")["metadata"]["labels"]


def test_scheduler_simulation_places_pods_only_where_they_fit(kube):
    kube.add_node("sn01", labels={"sched": "k8s"}, cpu="2")
    kube.add_node("sn02", labels={"sched": "k8s", "gpu": "yes"}, ready=False)
    kube.add_node("sn03", labels={"sched": "slurm"})
    kube.add_node("sn04", labels={"sched": "k8s"}, taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])
    kube.add_pod("a-1", requests={"cpu": "1500m"})
    kube.add_pod("b-1", requests={"cpu": "1"})  # sn01 is full after a-1; sn04's taint is not tolerated
    kube.add_pod("ml-1", tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}])
    kube.add_pod("gpu-1", node_selector={"gpu": "yes"})

    assert kube.schedule() == [("default/a-1", "sn01"), ("default/ml-1", "sn01")]
    b1 = kube.pod("b-1")["status"]["conditions"][0]
    assert (b1["type"], b1["status"], b1["reason"]) == ("PodScheduled", "False", "Unschedulable")
    assert b1["message"].startswith("0/4 nodes are available:") and "Insufficient cpu" in b1["message"]

    kube.set_node_ready("sn02", True)  # its kubelet came up
    assert kube.schedule() == [("default/b-1", "sn02"), ("default/gpu-1", "sn02")]
    gpu = kube.pod("gpu-1")
    assert gpu["status"]["phase"] == "Running" and gpu["spec"]["nodeName"] == "sn02"


def test_standalone_server_for_the_demo(tmp_path):
    state = tmp_path / "state.yaml"
    state.write_text(yaml.safe_dump({"nodes": [{"name": "sn01", "labels": {"sched": "k8s"}}],
                                     "pods": [{"name": "web-1"}]}))
    kubeconfig = tmp_path / "kubeconfig"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.kube_apiserver", "--port", str(port), "--state", str(state),
                             "--kubeconfig", str(kubeconfig), "--schedule-every", "0.2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"https://127.0.0.1:{port}" in line, proc.stderr.read() if proc.poll() is not None else line
        with KubernetesAdapter(KubernetesSettings(kubeconfig=str(kubeconfig))) as adapter:
            assert adapter.server_version().startswith("v1.")
            for _ in range(50):
                if adapter.node("sn01").busy:
                    break
                time.sleep(0.1)
            assert [p.name for p in adapter.node("sn01").pods] == ["web-1"]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
