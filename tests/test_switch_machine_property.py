"""A stateful property test of the switch machine (Hypothesis RuleBasedStateMachine), on
in-process fakes of both clusters and of power (tests/fakes.py) around a small model of the
nodes themselves: which image each runs, the jobs and pods on it, its boots.

Hypothesis interleaves balance passes with: jobs and pods arriving and ending (a pod bound by
nodeName too, past a cordon), BMC timeouts and wrong answers (ok, but nothing happened), boot
callbacks lost, late or sent twice, a slurmd or kubelet that registers before the callback or
never, drains and cordons refused, admins' role changes and cancels, slurmctld's resume and
resume-fail asks, a pass killed at any crash point, a clock skew between the boot server and
the balancer, and work waiting on either side, which makes the policy move nodes: lend idle ones
and reclaim busy ones from their borrower (sn01's home is Kubernetes, sn03's SLURM), evicting pods
(or refused by a PodDisruptionBudget) and requeueing jobs (or waiting for one that cannot be). After every step: no exception escaped a pass; no node with a job or a pod was
powered; no node was powered twice for one power intent; no ask was answered twice. At the end,
with the faults stopped: every switch ends (steady, or failed with a reason) within
phase_timeout_s x (max_retries + 2), and every ask has its answer."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from provisioner import config
from provisioner.clusters.kubernetes import PendingPod
from provisioner.clusters.slurm import PendingJob
from provisioner.reconcile import Reconciler
from provisioner.states import FAILED, K8S, SLURM, STEADY, SWITCHING
from provisioner.store import Store
from provisioner.switch import handlers, machine
from provisioner.switch.handlers import HOST_CLOCK_SKEW_S
from provisioner.power.dispatch import PowerResult
from tests.fakes import FakeKube, FakeSlurm, kube_node, slurm_node
from testbed.site import mac, write_site

NOW = 1_800_000_000.0
TIMEOUT = 30
GRACE = 10  # reclaim_grace_s of both sides
RETRIES = 1
NODES = ("sn01", "sn02", "sn03", "sn04")
K8S_START = ("sn03", "sn04")
PLAYED = st.sampled_from(("sn01", "sn03"))  # the nodes the rules act on: more happens to each
MAX_CRASH_POINTS = 4  # a pass is killed at its k-th crash point (handlers' and the machine's, every write)


class Killed(BaseException):
    """kill -9 of a pass: nothing in the code under test may catch it."""


class Crashes:
    """Replaces crash_point in the machine and the handlers: kill the pass at the k-th point."""

    def __init__(self):
        self.left: int | None = None
        self.seen: list[str] = []

    def __call__(self, name: str) -> None:
        if self.left is None:
            return
        self.left -= 1
        if self.left <= 0:
            self.left = None
            self.seen.append(name)
            raise Killed(name)


@dataclass
class Box:
    """One node as it is (not as the clusters or the store say)."""

    image: str | None  # the image it runs (None: rebooting)
    boot: int = 0  # how many times it booted
    # (its jobs and pods are the fakes': a requeue or an eviction removes them there)
    pending: str | None = None  # the image of a boot in progress
    powered_at: float = 0.0  # when provisioner last powered it (and it started to boot)
    callback_lost: bool = False
    never_registers: bool = False
    registered: bool = True
    called_back: bool = True
    powered_intents: set = field(default_factory=set)


HAPPENINGS: list[tuple[str, dict]] = []  # (method, its arguments' strategies): what may happen between passes


def happening(**arguments):
    def register(method):
        HAPPENINGS.append((method.__name__, arguments))
        return method
    return register


class SwitchMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        site_dir = _TMP[0] / f"site{next(_RUNS)}"
        nodes = [{"name": "cn[01-02]", "pool": "slurm", "macs": [mac(1, 1), mac(2, 1)], "bmc": {"address": "127.0.0.1"}},
                 *({"name": n, "pool": "shared", "default_role": "slurm", "macs": [mac(i, 3)], "ip": f"10.0.3.{i}",
                    "bmc": {"address": "127.0.0.1"}, **({"home": K8S} if n == "sn01" else {})}
                   for i, n in enumerate(NODES, start=1))]
        self.site = config.load(write_site(site_dir, nodes, policy={
            "phase_timeout_s": TIMEOUT, "max_retries": RETRIES, "cooldown_s": 0, "demand_persist_s": 0,
            "reclaim_grace_s": {SLURM: GRACE, K8S: GRACE}}))
        if os.path.exists(self.site.store):
            os.unlink(self.site.store)
        self.store = Store(self.site.store)
        self.store.seed((n.name, n.default_role) for n in self.site.nodes.values())
        self.now = NOW
        self.skew = 0.0
        # sn01, sn02 in SLURM; sn03, sn04 in Kubernetes (down k8s_connect in SLURM, as the paper does)
        self.boxes = {n: Box(image=K8S if n in K8S_START else SLURM) for n in NODES}
        self.slurm = FakeSlurm(**{n.name: slurm_node(n.name, slurmd_start_time=NOW - 3600)
                                  for n in self.site.nodes.values()})
        self.kube = FakeKube(**{n: kube_node(n, ready=n in K8S_START, role=K8S if n in K8S_START else SLURM,
                                             boot_id="b0") for n in NODES})
        for n in K8S_START:
            self.store.update(n, actor="test", kind="test", message="in k8s", desired_role=K8S)
            self.slurm.set(n, state="down", reason="k8s_connect", reason_is_ours=True,
                           flags=frozenset({"not_responding"}))
        self.bmc = "ok"  # ok | timeout | lie
        self.pods = 0  # pods made so far (their names)
        self.jobs = 0  # jobs started so far (their ids)
        self.violations: list[str] = []
        self.answered: dict[int, int] = {}
        self.crashes = Crashes()
        self._crash_point = machine.crash_point
        machine.crash_point = handlers.crash_point = self.crashes

    def teardown(self):
        machine.crash_point = handlers.crash_point = self._crash_point
        self.store.close()

    # -- the world's reactions ---------------------------------------------------------

    def power(self, site, nodes, action, *, netboot=False, store=None, actor=None, roles=None):
        results = []
        for node in nodes:
            name = node.name
            box = self.boxes[name]
            pods = self.kube.state[name].pods
            jobs = self.slurm.jobs.get(name, [])
            if jobs or pods:
                self.violations.append(f"{name} powered ({action}) with {len(jobs)} job(s), {len(pods)} pod(s)")
            intent = self.store.get(name).power_at
            if self.bmc != "timeout":  # a power action that failed is not one
                if (intent, action) in box.powered_intents:
                    self.violations.append(f"{name} powered twice for the intent of {intent}")
                box.powered_intents.add((intent, action))
            if box.pending is not None and self.now - box.powered_at < TIMEOUT:
                # Powering a node again while the boot it was powered for still runs, before any
                # timeout ran out: one intent, two power actions (the boot interrupted).
                self.violations.append(f"{name} powered again {self.now - box.powered_at:g} s into its boot")
            if self.bmc == "timeout":
                results.append(PowerResult(name, action, False, method="ipmi", error="BMC did not answer",
                                           error_kind="timeout"))
                continue
            if self.bmc == "ok" and action == "boot":
                self._power_cycle(name, (roles or {}).get(name) or self.store.get(name).desired_role)
            results.append(PowerResult(name, action, True, state="on", method="ipmi", netboot=netboot))
        return results

    def _power_cycle(self, name: str, role: str) -> None:
        box = self.boxes[name]
        box.image, box.pending, box.registered, box.called_back = None, role, False, False
        box.powered_at = self.now
        self.slurm.set(name, flags=self.slurm.state[name].flags | {"not_responding"})
        if name in self.kube.state:
            self.kube.set(name, ready=False)

    def _booted(self, name: str, lost: bool, never: bool) -> None:
        box = self.boxes[name]
        if box.pending is None:
            return
        box.image, box.pending, box.boot = box.pending, None, box.boot + 1
        box.callback_lost, box.never_registers = lost, never

    def _callback(self, name: str) -> None:
        box = self.boxes[name]
        if box.image is None:
            return
        box.called_back = True
        # The boot server stamps it with its own clock.
        self.store.update(name, actor="boot-server", kind="booted", message=f"booted {box.image}",
                          booted_role=box.image, booted_version="1", booted_at=self.now + self.skew)

    def _register(self, name: str) -> None:
        box = self.boxes[name]
        if box.image is None or box.registered:
            return
        box.registered = True
        if box.image == SLURM:
            self.slurm.set(name, flags=self.slurm.state[name].flags - {"not_responding"},
                           slurmd_start_time=self.now - 2)
        else:
            self.kube.set(name, ready=True, boot_id=f"b{box.boot}-{name}")

    # -- faults and work -----------------------------------------------------------------

    @initialize()
    def start(self):
        pass

    def balance_pass(self, seconds, crash, only):
        """Time goes by (the passes of cron or `provisioner run`), then a pass, maybe killed at its
        crash-th crash point."""
        self.now += seconds
        self.crashes.left = crash
        rec = Reconciler(self.site, self.store, slurm=self.slurm, kube=self.kube, power=self.power,
                         clock=lambda: self.now)
        try:
            rec.run_pass(only=list(NODES) if only else None)
        except Killed:
            pass
        except Exception as exc:  # noqa: BLE001 - the invariant this test is about
            self.violations.append(f"a pass raised {exc.__class__.__name__}: {exc}")
        finally:
            self.crashes.left = None

    @happening(name=PLAYED, lost=st.booleans(), never=st.booleans())
    def boot_completes(self, name, lost, never):
        self._booted(name, lost, never)

    @happening(name=PLAYED)
    def callback(self, name):  # also a late one, or a second one (duplicated)
        if not self.boxes[name].callback_lost or self.boxes[name].called_back:
            self._callback(name)

    @happening(name=PLAYED)
    def daemon_registers(self, name):  # before or after the callback
        if not self.boxes[name].never_registers:
            self._register(name)

    @happening(skew=st.sampled_from([0.0, -HOST_CLOCK_SKEW_S, HOST_CLOCK_SKEW_S, -1.0]))
    def clock_skew(self, skew):
        self.skew = skew

    @happening(mode=st.sampled_from(["ok", "ok", "timeout", "lie"]))
    def bmc_answers(self, mode):
        self.bmc = mode

    @happening(op=st.sampled_from([("slurm", "drain"), ("slurm", "resume"), ("kube", "cordon"), ("kube", "uncordon"),
                              ("kube", "label"), ("slurm", "nodes")]), on=st.booleans())
    def refuse(self, op, on):
        fake = self.slurm if op[0] == "slurm" else self.kube
        if on:
            fake.refuse[op[1]] = f"{op[1]} refused (a webhook, RBAC, slurmctld down)"
        else:
            fake.refuse.pop(op[1], None)

    @happening(name=PLAYED, hold=st.booleans())
    def someone_else_drains(self, name, hold):
        """An admin's own drain (a bad DIMM), set or lifted: never provisioner's to lift."""
        s = self.slurm.state[name]
        if hold and not (s.drain or s.down):
            self.slurm.set(name, flags=s.flags | {"drain"}, reason="bad DIMM", reason_is_ours=False)
        elif not hold and s.drain and not s.reason_is_ours:
            self.slurm.set(name, flags=s.flags - {"drain"}, reason=None)

    @happening(name=PLAYED, hold=st.booleans())
    def someone_else_cordons(self, name, hold):
        k = self.kube.state[name]
        if hold and not k.unschedulable:
            self.kube.set(name, unschedulable=True, cordoned_by_us=False)
        elif not hold and k.unschedulable and not k.cordoned_by_us:
            self.kube.set(name, unschedulable=False)

    @happening(name=PLAYED, requeue=st.booleans())
    def job_starts(self, name, requeue):
        s, box = self.slurm.state[name], self.boxes[name]
        if box.image == SLURM and box.registered and s.available:
            self.jobs += 1
            self.slurm.run_job(name, str(self.jobs), requeue=requeue, start_time=self.now)

    @happening(name=PLAYED)
    def job_ends(self, name):
        if self.slurm.jobs.get(name):
            self.slurm.end_job(name, self.slurm.jobs[name][0].job_id)

    @happening(nodes=st.sampled_from([0, 1, 1, 3]))
    def slurm_work_waits(self, nodes):
        """A job as wide as `nodes` waits (0: none): more than the idle nodes makes a reclaim."""
        self.slurm.pending = [PendingJob("pending-1", "Resources", ("batch",), nodes, nodes)] if nodes else []

    @happening(count=st.sampled_from([0, 1, 1, 4]))
    def pods_wait(self, count):
        """`count` pods that each fill a node wait."""
        self.kube.pending = [PendingPod("ml", f"train-{i}", 4000, 1 << 30, 0, (), (), (), 0, None, "Unschedulable")
                             for i in range(count)]

    @happening(on=st.booleans())
    def budget_refuses(self, on):
        self.kube.evictable = not on

    @happening(name=PLAYED, by_node_name=st.booleans())
    def pod_starts(self, name, by_node_name):
        k, box = self.kube.state[name], self.boxes[name]
        if box.image == K8S and box.registered and k.ready and (by_node_name or not k.unschedulable):
            self.pods += 1
            self.kube.set(name, pods=k.pods + kube_node(name, pods=(f"pod-{self.pods}",)).pods)

    @happening(name=PLAYED)
    def pod_ends(self, name):
        self.kube.set(name, pods=self.kube.state[name].pods[1:])

    @happening(name=PLAYED, role=st.sampled_from([SLURM, K8S]))
    def admin_role(self, name, role):
        rec = Reconciler(self.site, self.store, slurm=self.slurm, kube=self.kube, power=self.power,
                         clock=lambda: self.now)
        try:
            rec.change_role([name], role, actor="admin:prop", reason="property test")
        except Exception as exc:  # noqa: BLE001 - "wait for it to finish" is a clear refusal
            if "run role again" not in str(exc):
                self.violations.append(f"role raised {exc}")

    @happening(name=PLAYED)
    def admin_cancel(self, name):
        rec = Reconciler(self.site, self.store, slurm=self.slurm, kube=self.kube, power=self.power,
                         clock=lambda: self.now)
        rec.cancel([name], actor="admin:prop", reason="property test")

    @happening(name=PLAYED, kind=st.sampled_from(["resume", "resume-fail"]))
    def slurmctld_asks(self, name, kind):
        self.store.add_asks([name], kind, source="slurmctld", reason="property test", actor="slurmctld")

    # -- the one rule: what happens in the world, time goes by, a pass ---------------------

    @rule(happenings=st.lists(st.deferred(lambda: st.one_of(*(
              st.tuples(st.just(name), st.fixed_dictionaries(kw)) for name, kw in HAPPENINGS))), max_size=4),
          seconds=st.sampled_from([0, 1, 5, 15, TIMEOUT + 1]),
          crash=st.one_of(st.none(), st.none(), st.integers(1, MAX_CRASH_POINTS)), only=st.booleans())
    def happenings_then_a_pass(self, happenings, seconds, crash, only):
        for name, kw in happenings:
            getattr(self, name)(**kw)
        self.balance_pass(seconds, crash, only)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def nothing_went_wrong(self):
        assert not self.violations, self.violations

    @invariant()
    def every_ask_answered_at_most_once(self):
        answers = [e.data["ask"] for e in self.store.events(kinds=["ask-granted", "ask-refused", "ask-done",
                                                                    "ask-failed"])]
        assert len(answers) == len(set(answers)), answers

    @invariant()
    def failed_says_why(self):
        for name, st_ in self.store.nodes(NODES).items():
            assert st_.phase != FAILED or st_.failed_reason, st_

    # -- once the faults stop ------------------------------------------------------------

    def check_liveness(self):
        """Faults off, work drains away, boots and callbacks come: every switch ends within
        phase_timeout_s x (max_retries + 2) (plus one pass interval), every ask is answered."""
        self.bmc, self.skew = "ok", 0.0
        self.slurm.refuse.clear()
        self.kube.refuse.clear()
        self.slurm.pending, self.kube.pending, self.kube.evictable = [], [], True
        self.slurm.jobs.clear()
        for name, box in self.boxes.items():
            self.slurm.set(name, state="idle" if self.slurm.state[name].state == "allocated" else
                           self.slurm.state[name].state, alloc_cpus=0)
            self.kube.set(name, pods=())
            box.callback_lost = box.never_registers = False
        step = 5
        deadline = self.now + TIMEOUT * (RETRIES + 2) + step
        while self.now <= deadline:
            for name in NODES:
                self._booted(name, False, False)
                self._register(name)
                box = self.boxes[name]
                if box.image is not None and not box.called_back:
                    self._callback(name)
            self.balance_pass(0, None, False)
            self.nothing_went_wrong()
            states = self.store.nodes(NODES)
            if not any(s.phase in SWITCHING for s in states.values()) and not self.store.open_asks():
                break
            self.now += step
        stuck = {n: (s.phase, s.target_role, s.attempts) for n, s in self.store.nodes(NODES).items()
                 if s.phase in SWITCHING}
        assert not stuck, f"switches still running {TIMEOUT * (RETRIES + 2)} s after the faults stopped: {stuck}"
        assert self.store.open_asks() == [], self.store.open_asks()
        for s in self.store.nodes(NODES).values():
            assert s.phase in (STEADY, FAILED) and (s.phase == STEADY or s.failed_reason)
        # Nothing stranded: a steady node carries no drain or cordon of ours on the side it serves
        # (a pass killed between a rollback's write and the release leaves one for the next pass).
        self.balance_pass(0, None, False)
        for name, s in self.store.nodes(NODES).items():
            if s.phase != STEADY:
                continue
            if s.desired_role == SLURM:
                n = self.slurm.state[name]
                assert not (("drain" in n.flags or n.state == "down") and n.reason_is_ours), (name, n)
            else:
                assert not self.kube.state[name].cordoned_by_us, name


_TMP: list = []  # the folder of this test's sites
_RUNS = itertools.count()


@pytest.mark.parametrize("seed", [0])
def test_the_switch_always_ends(tmp_path, seed):
    class Checked(SwitchMachine):
        def teardown(self):
            try:
                self.check_liveness()
            finally:
                super().teardown()

    runs = 50
    shm = Path("/dev/shm")  # the store's fsyncs are most of the time on a disk
    _TMP[:] = [Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path]
    Checked.TestCase.settings = settings(max_examples=runs, stateful_step_count=40, deadline=None, derandomize=True,
                                         suppress_health_check=list(HealthCheck), database=None)
    try:
        Checked.TestCase().runTest()
    finally:
        if _TMP and _TMP[0] != tmp_path:
            shutil.rmtree(_TMP[0], ignore_errors=True)
        _TMP.clear()
