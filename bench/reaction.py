"""Reaction time of shared-node switching: event-driven (`provisioner run`) against cron
(`provisioner balance` every 60 s), in the same run, against the real parts (a real slurmctld,
the real Kubernetes control plane, BMC simulators, the boot endpoint: testbed/simnodes.py).

Reaction = from the demand appearing (just before `sbatch`, or just before the pod is created)
to the switch's first action in the store's event log (the first `switch` event, "switch ...
requested", or the first `phase` event of a shared node; Store.events() `ts`).

(a) SLURM, event-driven: a power-saving world like tests/test_slurm_power_saving.py's ps_site
    (slurmctld runs our ResumeProgram); `provisioner run` as a subprocess; fixed nodes full; one
    sbatch. Also timed: sbatch -> ResumeProgram's ask recorded, sbatch -> the job RUNNING.
(b) Kubernetes, event-driven: a normal world, `provisioner run`, the fixed k8s node full, one pod
    the scheduler cannot place; and, with kubernetes.provisioning_requests on, one
    ProvisioningRequest of provisioner's class for a whole node (created as Kueue creates them;
    the CRD from the Kueue build, testbed/kueue.py).
(c) cron, the same two demands with no daemon: one `provisioner balance` (the CLI, as cron runs
    it) started once the demand is visible; measured: the pass's start -> its first action. The
    cron wait is not waited for: reaction = U(0, 60 s) + that measured time, a model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from testbed.kube_cluster import KubeCluster
from testbed.kueue import Kueue
from testbed.power_saving import settle, start_site
from testbed.simnodes import ROOT, SimSite, provisioner_cmd
from testbed.wait import wait_for

TITLE = "reaction time: demand -> a shared node's first switch action, provisioner run vs cron (real slurmctld + API server)"
GOAL_S = 2.0  # p95, event-driven
CRON_PERIOD_S = 60.0
FIRST_ACTION = ("switch", "phase")


def add_arguments(group) -> None:
    group.add_argument("--reaction-rounds", type=int, default=5, help="rounds per case (default 5)")
    group.add_argument("--reaction-keep", action="store_true", help="keep the temporary folder")


# --------------------------------------------------------------------------- helpers


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(v) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"n": len(v), "p50": round(q(0.5), 3), "p95": round(q(0.95), 3), "max": round(v[-1], 3),
            "min": round(v[0], 3)}


def _cron_model(pass_times: list[float]) -> dict:
    """U(0, period) wait for the next cron tick + a measured pass time (each equally likely)."""
    grid = 1000
    samples = [CRON_PERIOD_S * (i + 0.5) / grid + p for p in pass_times for i in range(grid)]
    return {**_pcts(samples), "n": len(pass_times)}


def _with_run(path: Path, **run) -> None:
    data = yaml.safe_load(path.read_text())
    data["run"] = run
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class Daemon:
    """`provisioner --config SITE run` as a subprocess; stopped by its pid (SIGTERM, then kill)."""

    def __init__(self, site: SimSite, log: Path):
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([*provisioner_cmd(), "--config", str(site.config), "run"], stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        wait_for(lambda: "pass (start):" in log.read_text() or self.proc.poll() is not None, 60,
                 "the daemon's first pass")
        if self.proc.poll() is not None:
            raise RuntimeError(f"provisioner run exited {self.proc.returncode}: {log.read_text()[-2000:]}")
        # runner.MIN_GAP_S (1 s): an event-driven pass starts at least that long after the last
        # one ended. Demand arrives long after the start pass in real life: wait it out.
        time.sleep(1.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _first(site: SimSite, kinds, since: float) -> tuple[float, str, str] | None:
    evs = [e for e in site.events(site.shared, kinds=list(kinds)) if e.ts >= since - 0.001]
    if not evs:
        return None
    e = min(evs, key=lambda e: e.ts)
    return e.ts, e.node, f"{e.kind}: {e.message}"


def _wait_first(site: SimSite, since: float, timeout: float = 60):
    return wait_for(lambda: _first(site, FIRST_ACTION, since), timeout, "the switch's first action")


# --------------------------------------------------------------------------- (a) SLURM power saving


def _slurm_event_driven(work: Path, kube: KubeCluster, rounds: int, log) -> dict:
    site, _ = start_site(work, kube)
    roles = {n: "k8s" for n in site.shared}
    rows = []
    try:
        for r in range(rounds):
            site.reset(roles=roles)
            settle(site, timeout=90)
            _with_run(site.config, interval_s=3600, busy_interval_s=1)  # no timer pass can be credited
            daemon = Daemon(site, work / f"run-{r}.log")
            try:
                fixed = site.fill_fixed()
                t0 = time.time()
                job = site.slurm.sbatch(wrap="sleep 1")
                ts, node, what = _wait_first(site, t0)
                ask = _first(site, ("ask",), t0)
                wait_for(lambda: site.slurm.job_state(job)[0] in ("RUNNING", "COMPLETING", ""), 120,
                         f"job {job} to run", interval=0.1)
                t_run = time.time()
                row = {"round": r, "node": node, "first_action": what, "to_first_action_s": round(ts - t0, 3),
                       "to_ask_s": round(ask[0] - t0, 3) if ask else None,
                       "ask_to_first_action_s": round(ts - ask[0], 3) if ask else None,
                       "to_running_s": round(t_run - t0, 3)}
                rows.append(row)
                log(f"  slurm event-driven round {r}: {row}")
                for j in [*fixed, job]:
                    site.slurm.run("scancel", j, check=False)
            finally:
                daemon.stop()
        site.wait_idle()
    finally:
        site.stop()
    return {"rounds": rows, "to_first_action_s": _pcts([x["to_first_action_s"] for x in rows]),
            "to_ask_s": _pcts([x["to_ask_s"] for x in rows if x["to_ask_s"] is not None]),
            "ask_to_first_action_s": _pcts([x["ask_to_first_action_s"] for x in rows
                                            if x["ask_to_first_action_s"] is not None]),
            "to_running_s": _pcts([x["to_running_s"] for x in rows])}


# --------------------------------------------------------------------------- (b), (c) the normal world


def _pod_demand(site: SimSite, r: int) -> tuple[float, str]:
    site.kube.add_pod(f"big-{r}", node="kn01", requests={"cpu": "1", "memory": "128Mi"})
    t0 = time.time()
    site.kube.add_pod(f"web-{r}", namespace="ml")
    return t0, f"web-{r}"


PRS = "/apis/autoscaling.x-k8s.io/v1/namespaces/default/provisioningrequests"


def _provreq_demand(site: SimSite, r: int) -> float:
    """A PodTemplate and a ProvisioningRequest for one whole node; returns when it was created."""
    from provisioner.provisioning_demand import CLASS_NAME

    api = site.kube.api
    api.create("/api/v1/namespaces/default/podtemplates", {
        "metadata": {"name": f"gang-{r}"}, "template": {"spec": {"containers": [
            {"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "1"}}}]}}})
    t0 = time.time()
    api.create(PRS, {"apiVersion": "autoscaling.x-k8s.io/v1", "kind": "ProvisioningRequest",
                     "metadata": {"name": f"gang-{r}"},
                     "spec": {"provisioningClassName": CLASS_NAME,
                              "podSets": [{"podTemplateRef": {"name": f"gang-{r}"}, "count": 1}]}})
    return t0


def _normal_world(work: Path, kube: KubeCluster, rounds: int, log) -> dict:
    site = SimSite(work, shared="sn[01-02]", kube=kube)
    all_slurm = {"sn01": "slurm", "sn02": "slurm"}
    all_k8s = {"sn01": "k8s", "sn02": "k8s"}
    kube_ev, cron_kube, cron_slurm, provreq_ev = [], [], [], []
    site.start()
    try:
        Kueue(kube, work / "kueue").apply_crds(120)  # the ProvisioningRequest CRD; Kueue itself is not needed
        for r in range(rounds):
            # (b) ProvisioningRequest, event-driven
            site.reset(roles=all_slurm, kubernetes={"provisioning_requests": True})
            _with_run(site.config, interval_s=3600, busy_interval_s=1)
            daemon = Daemon(site, work / f"run-provreq-{r}.log")
            try:
                t0 = _provreq_demand(site, r)
                ts, node, what = _wait_first(site, t0)
            finally:
                daemon.stop()
                site.kube.api.delete(f"{PRS}/gang-{r}")
            row = {"round": r, "node": node, "first_action": what, "to_first_action_s": round(ts - t0, 3)}
            provreq_ev.append(row)
            log(f"  ProvisioningRequest event-driven round {r}: {row}")
            site.wait_idle()

            # (b) Kubernetes, event-driven
            site.reset(roles=all_slurm)
            _with_run(site.config, interval_s=3600, busy_interval_s=1)
            daemon = Daemon(site, work / f"run-{r}.log")
            try:
                t0, pod = _pod_demand(site, r)
                ts, node, what = _wait_first(site, t0)
            finally:
                daemon.stop()
            row = {"round": r, "node": node, "first_action": what, "to_first_action_s": round(ts - t0, 3)}
            kube_ev.append(row)
            log(f"  kubernetes event-driven round {r}: {row}")

            # (c) cron, Kubernetes demand: the pod is Unschedulable, then one CLI pass
            site.wait_idle()
            site.reset(roles=all_slurm)
            _pod_demand(site, r)
            site.kube.wait_unschedulable(f"web-{r}", "ml")
            cron_kube.append(_cron_pass(site, r, "kubernetes", log))

            # (c) cron, SLURM demand: the job Pending (Resources), then one CLI pass
            site.wait_idle()
            site.reset(roles=all_k8s)
            site.fill_fixed()
            site.submit_pending(wrap="sleep 1")
            cron_slurm.append(_cron_pass(site, r, "slurm", log))
            site.wait_idle()
    finally:
        site.stop()
    return {
        "kubernetes_event_driven": {"rounds": kube_ev, "to_first_action_s": _pcts([x["to_first_action_s"] for x in kube_ev])},
        "provreq_event_driven": {"rounds": provreq_ev,
                                 "to_first_action_s": _pcts([x["to_first_action_s"] for x in provreq_ev])},
        "cron_kubernetes": _cron_summary(cron_kube),
        "cron_slurm": _cron_summary(cron_slurm),
    }


def _cron_pass(site: SimSite, r: int, side: str, log) -> dict:
    t0 = time.time()
    proc, report = site.balance()
    t_end = time.time()
    first = _first(site, FIRST_ACTION, t0)
    if first is None:
        raise RuntimeError(f"cron pass ({side}) took no action: exit {proc.returncode} {proc.stderr[-1500:]}")
    row = {"round": r, "node": first[1], "first_action": first[2], "pass_to_first_action_s": round(first[0] - t0, 3),
           "pass_s": round(t_end - t0, 3)}
    log(f"  cron {side} round {r}: {row}")
    return row


def _cron_summary(rows: list[dict]) -> dict:
    times = [x["pass_to_first_action_s"] for x in rows]
    return {"rounds": rows, "pass_to_first_action_s": _pcts(times), "pass_s": _pcts([x["pass_s"] for x in rows]),
            "modelled_reaction_s": _cron_model(times)}


# --------------------------------------------------------------------------- run / summary


def run(args) -> dict:
    import sys

    rounds = getattr(args, "reaction_rounds", 5)
    keep = getattr(args, "reaction_keep", False)
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        raise RuntimeError("needs root and Debian's slurmctld/slurmd/munged (the SLURM test cluster)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-reaction-"))
    kube = KubeCluster(work / "kube")
    started = time.monotonic()
    try:
        kube.start()
        log(f"  control plane up in {time.monotonic() - started:.1f} s; {work}")
        slurm = _slurm_event_driven(work / "ps", kube, rounds, log)
        normal = _normal_world(work / "sim", kube, rounds, log)
    finally:
        kube.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {"rounds": rounds, "cron_period_s": CRON_PERIOD_S, "goal_p95_s": GOAL_S,
            "slurm_event_driven": slurm, **normal, "seconds": round(time.monotonic() - started, 1)}


def summary(result: dict) -> str:
    def row(name: str, p: dict, note: str = "") -> str:
        if not p.get("n"):
            return f"| {name} | 0 | - | - | - | {note} |"
        return f"| {name} | {p['n']} | {p['p50']:.2f} | {p['p95']:.2f} | {p['max']:.2f} | {note} |"

    s, k = result["slurm_event_driven"], result["kubernetes_event_driven"]
    pr = (result.get("provreq_event_driven") or {}).get("to_first_action_s") or {}
    cs, ck = result["cron_slurm"], result["cron_kubernetes"]
    lines = [
        "| case | n | p50 s | p95 s | max s | what |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        row("SLURM, event-driven: sbatch -> first switch action", s["to_first_action_s"], "measured"),
        row("  (sbatch -> ResumeProgram's ask recorded)", s["to_ask_s"], "measured: slurmctld's part"),
        row("  (ask recorded -> first switch action: the daemon's part)", s["ask_to_first_action_s"],
            "measured, part of the above"),
        row("  (sbatch -> job RUNNING on the switched node)", s["to_running_s"], "measured"),
        row("Kubernetes, event-driven: pod created -> first switch action", k["to_first_action_s"], "measured"),
        row("Kubernetes, event-driven: ProvisioningRequest created -> first switch action", pr, "measured"),
        row("SLURM, cron every 60 s: job pending -> first switch action", cs["modelled_reaction_s"],
            "**modelled**: U(0,60 s) + measured pass time"),
        row("  (cron pass start -> its first action)", cs["pass_to_first_action_s"], "measured"),
        row("Kubernetes, cron every 60 s: pod pending -> first switch action", ck["modelled_reaction_s"],
            "**modelled**: U(0,60 s) + measured pass time"),
        row("  (cron pass start -> its first action)", ck["pass_to_first_action_s"], "measured"),
    ]
    goal = result["goal_p95_s"]
    verdict = []
    for name, p in (("SLURM", s["to_first_action_s"]), ("Kubernetes", k["to_first_action_s"]),
                    ("ProvisioningRequest", pr)):
        if p.get("n"):
            verdict.append(f"- event-driven {name} p95 <= {goal:g} s: {p['p95']:.2f} s: "
                           + ("**met**" if p["p95"] <= goal else "**MISSED**"))
    return "\n".join(lines) + "\n\n" + "\n".join(verdict)
