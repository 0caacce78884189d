"""A ProvisioningRequest and its PodTemplates, read as one all-or-nothing request (pure)."""

import pytest

from provisioner.provisioning import gang_asks
from provisioner.clusters.provisioning_requests import Seen
from provisioner.provisioning_demand import CLASS_NAME, BadRequest, is_ours, label_value, parse


def pr(*pod_sets, status=None, name="train-1"):
    return {"metadata": {"name": name, "namespace": "ml", "uid": "0123-4567-89ab-cdef-0000"},
            "spec": {"provisioningClassName": CLASS_NAME,
                     "podSets": [{"podTemplateRef": {"name": t}, "count": c} for t, c in pod_sets]},
            "status": status or {}}


def tpl(cpu="2", memory="1Gi", gpus=None, selector=None, tolerations=None):
    req = {"cpu": cpu, "memory": memory}
    if gpus:
        req["nvidia.com/gpu"] = gpus
    return {"template": {"spec": {"containers": [{"name": "c", "resources": {"requests": req}}],
                                  "nodeSelector": selector or {}, "tolerations": tolerations or []}}}


def test_pod_sets_become_what_each_pod_needs_times_how_many():
    r = parse(pr(("a", 2), ("b", 1)), {"a": tpl(selector={"zone": "x"}, tolerations=[{"key": "gpu",
                                                                                       "operator": "Exists"}]),
                                       "b": tpl(cpu="500m", memory="128Mi", gpus="1")})
    a, b = r.pod_sets
    assert (a.count, a.cpu_m, a.memory, a.gpus, a.node_selector) == (2, 2000, 1 << 30, 0, (("zone", "x"),))
    assert a.tolerations[0].key == "gpu" and a.tolerations[0].operator == "Exists"
    assert (b.count, b.cpu_m, b.memory, b.gpus) == (1, 500, 128 << 20, 1)
    assert r.key == "ml/train-1" and r.label == "ml.train-1" and not r.finished


def test_what_provisioner_recorded_before_is_read_back():
    status = {"conditions": [{"type": "Provisioned", "status": "True", "lastTransitionTime": "2026-12-03T10:00:00Z"}],
              "provisioningClassDetails": {"provisioner.io/nodes": "sn01,sn02"}}
    r = parse(pr(("a", 2), status=status), {"a": tpl()})
    assert r.booked == ("sn01", "sn02") and r.provisioned_at.year == 2026
    (g,) = gang_asks([Seen("ml", "train-1", r, None, r.conditions)], booking_s=60)
    assert g.id == "ml/train-1" and g.booked == ("sn01", "sn02") and g.provisioned_at and g.booking_s == 60
    assert g.pod_sets[0][1] == 2 and g.pod_sets[0][0].cpu_m == 2000


@pytest.mark.parametrize("templates, reason, words", [
    ({}, "PodTemplateNotFound", "PodTemplate ml/a does not exist"),
    ({"a": tpl(cpu="two")}, "InvalidQuantity", "PodTemplate ml/a: a resource quantity does not parse"),
    ({"a": tpl(memory="1Gx")}, "InvalidQuantity", "does not parse"),
])
def test_bad_input_says_what_is_wrong(templates, reason, words):
    with pytest.raises(BadRequest) as exc:
        parse(pr(("a", 1)), templates)
    assert exc.value.reason == reason and words in str(exc.value)


def test_a_count_that_is_not_a_positive_integer_or_no_pod_set_is_bad():
    with pytest.raises(BadRequest, match="count 0"):
        parse(pr(("a", 0)), {"a": tpl()})
    with pytest.raises(BadRequest, match="no pod sets"):
        parse(pr(), {})


def test_only_our_class_and_label_values_fit_in_63_characters():
    assert is_ours(pr(("a", 1)))
    assert not is_ours({"spec": {"provisioningClassName": "check-capacity.autoscaling.x-k8s.io"}})
    long = label_value("namespace-" * 4, "request-" * 6, "0123-4567-89ab-cdef-0000")
    assert len(long) <= 63 and long.endswith(".0123456789ab")


def test_finished_requests_are_not_asks():
    status = {"conditions": [{"type": "Failed", "status": "True"}]}
    r = parse(pr(("a", 1), status=status), {"a": tpl()})
    assert r.finished and gang_asks([Seen("ml", "train-1", r, None, r.conditions)], 600) == ()


class FakeApi:
    """ProvisioningRequests' I/O, in memory: what the provider writes, for the fast test."""

    def __init__(self, labelled=None):
        self.status, self.labels, self._labelled = [], [], dict(labelled or {})

    def set_status(self, seen, conditions, nodes=None, label=None):
        seen.conditions.update({c["type"]: c for c in conditions})
        self.status.append((seen.key, [(c["type"], c["status"], c["reason"]) for c in conditions], nodes, label))
        return True

    def label_nodes(self, names, value):
        self.labels.append((tuple(names), value))
        for n in names:
            if value is None:
                self._labelled.pop(n, None)
            else:
                self._labelled[n] = value

    def labelled(self):
        return self._labelled


class FakeStore:
    def __init__(self):
        self.events = []

    def add_event(self, node, actor, kind, message, data=None):
        self.events.append((kind, message))


def test_the_provider_writes_the_conditions_labels_and_events_of_each_answer():
    from provisioner.policy import GangAnswer
    from provisioner.provisioning import Provider

    ok = parse(pr(("a", 2)), {"a": tpl()})
    bad = BadRequest("PodTemplateNotFound", "PodTemplate ml/b does not exist")
    seen = [Seen("ml", "train-1", ok, None, {}), Seen("ml", "bad", None, bad, {})]
    api, store = FakeApi(labelled={"sn09": "ml.old"}), FakeStore()
    notes: list[str] = []
    answers = [GangAnswer("ml/train-1", "provisioned", ("sn01", "sn02"), "sn[01-02] in Kubernetes, booked for it")]
    errors = Provider(api, store, "test").serve(seen, answers, notes, dry_run=False)
    assert errors == []
    assert ("ml/train-1", [("Accepted", "True", "Accepted")], None, None) in api.status
    assert ("ml/bad", [("Failed", "True", "PodTemplateNotFound")], None, None) in api.status
    assert ("ml/train-1", [("Provisioned", "True", "Provisioned")], ("sn01", "sn02"), "ml.train-1") in api.status
    assert api.labels == [(("sn01", "sn02"), "ml.train-1"), (("sn09",), None)]  # a stale booking goes
    assert [k for k, _ in store.events] == ["provreq-accepted", "provreq-failed", "provreq-provisioned",
                                            "provreq-released"]
    assert "ProvisioningRequest ml/train-1: provisioned: sn[01-02] in Kubernetes, booked for it" in notes

    # A dry run only says what it would do.
    api2, store2, notes2 = FakeApi(), FakeStore(), []
    Provider(api2, store2, "test").serve(seen, answers, notes2, dry_run=True)
    assert api2.status == [] and api2.labels == [] and store2.events == [] and len(notes2) == 2


def test_an_expired_booking_frees_its_nodes_and_a_waiting_request_is_told_once():
    from provisioner.policy import GangAnswer
    from provisioner.provisioning import Provider

    status = {"conditions": [{"type": "Provisioned", "status": "True", "lastTransitionTime": "2026-12-03T10:00:00Z"}],
              "provisioningClassDetails": {"provisioner.io/nodes": "sn01"}}
    old = parse(pr(("a", 1), status=status), {"a": tpl()})
    new = parse(pr(("a", 2), name="pair"), {"a": tpl()})
    seen = [Seen("ml", "train-1", old, None, dict(old.conditions)), Seen("ml", "pair", new, None, {})]
    api, store = FakeApi(labelled={"sn01": "ml.train-1"}), FakeStore()
    waiting = GangAnswer("ml/pair", "waiting", (), "all or nothing: 1 of 2 pod(s) (1000m CPU) have no node now")
    Provider(api, store, "test").serve(seen, [GangAnswer("ml/train-1", "expired", (), "booked for 600 s"), waiting],
                                       [], dry_run=False)
    assert ("ml/train-1", [("BookingExpired", "True", "BookingExpired")], None, None) in api.status
    assert (("sn01",), None) in api.labels
    assert ("ml/pair", [("Provisioned", "False", "Waiting")], (), "ml.pair") in api.status
    # The same answer again changes nothing and records nothing.
    api.status.clear()
    events = len(store.events)
    Provider(api, store, "test").serve(seen[1:], [waiting], [], dry_run=False)
    assert api.status == [] and len(store.events) == events


def test_requests_that_cannot_be_read_are_the_passes_error_and_nothing_is_unlabelled():
    from provisioner.errors import OperationError
    from provisioner.provisioning import Provider

    class Down(FakeApi):
        def requests(self):
            raise OperationError("Kubernetes API x refused listing ProvisioningRequests (HTTP 404: not found)")

    api = Down(labelled={"sn01": "ml.a"})
    p = Provider(api, FakeStore(), "test")
    assert p.read() == ()
    errors = p.serve((), [], [], dry_run=False)
    assert errors == ["ProvisioningRequests not served in this pass: Kubernetes API x refused listing "
                      "ProvisioningRequests (HTTP 404: not found)"]
    assert api.labels == []  # a booking is not dropped because the requests could not be read


def test_a_pod_set_that_does_not_tolerate_the_shared_nodes_taints_is_never_served_by_them():
    from dataclasses import replace

    from provisioner.policy import decide
    from provisioner.taints import Taint
    from tests.test_policy import moved, node, snap

    # Both shared nodes are GPU nodes in Kubernetes (their Node objects' taint); sn2 is also
    # unreachable now (the lifecycle controller's taint: transient, it does not count).
    gpu = Taint("gpu", "a100", "NoSchedule")
    unreachable = Taint("node.kubernetes.io/unreachable", None, "NoExecute")
    nodes = [replace(node("sn1", "slurm"), k8s_taints=(gpu,)), replace(node("sn2", "slurm"), k8s_taints=(gpu, unreachable))]

    def answer(tolerations):
        r = parse(pr(("a", 2)), {"a": tpl(cpu="4", memory="1Mi", tolerations=tolerations)})
        d = decide(snap(nodes, gangs=gang_asks([Seen("ml", "train-1", r, None, {})], 600)))
        return d.gangs[0], moved(d)

    (a, moves) = answer(None)
    assert (a.outcome, moves) == ("failed", []) and "can never be served" in a.message
    (a, moves) = answer([{"key": "gpu", "operator": "Equal", "value": "h100"}])  # another value: still not
    assert a.outcome == "failed"
    (a, moves) = answer([{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert a.outcome == "switching" and moves == [("sn1", "k8s"), ("sn2", "k8s")]
    # A PreferNoSchedule taint only steers: it never keeps a pod set off.
    nodes = [replace(n, k8s_taints=(Taint("gpu", None, "PreferNoSchedule"),)) for n in nodes]
    assert answer(None)[0].outcome == "switching"


def test_unschedulable_pods_that_do_not_tolerate_the_shared_nodes_taints_are_no_demand_for_them():
    from dataclasses import replace

    from provisioner.policy import PendingPod, decide
    from provisioner.taints import Taint, Toleration
    from tests.test_policy import moved, node, snap

    nodes = [replace(node("sn1", "slurm"), k8s_taints=(Taint("dedicated", "ml", "NoExecute"),))]
    pod = PendingPod("ml", "p0", cpu_m=1000)
    assert moved(decide(snap(nodes, pods=(pod,)))) == []
    pod = replace(pod, tolerations=(Toleration("dedicated", "Equal", "ml", None),))
    assert moved(decide(snap(nodes, pods=(pod,)))) == [("sn1", "k8s")]
