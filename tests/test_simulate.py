"""`provisioner simulate` on tiny traces whose outcome is worked out by hand: one job,
one pod, one shared node; contention; a flap the cooldown prevents; EASY backfilling; FIFO
first-fit; the trace readers' errors; the command's table, JSON, sweep and plots."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from provisioner.cli import main
from provisioner.model import Policy
from provisioner.simulate import engine, pods as podsmod, report, swf
from provisioner.simulate.engine import Cluster, Dist, Settings, simulate
from provisioner.simulate.pods import Pod
from tests.support import require_module
from provisioner.simulate.swf import Job
from provisioner.states import K8S, SLURM

EAGER = Policy(min_nodes={SLURM: 0, K8S: 0}, cooldown_s=0, demand_persist_s=0, max_in_flight=2)


def settings(policy: Policy = EAGER, switch: float = 30.0, **kw) -> Settings:
    return Settings(policy=policy, switch={SLURM: Dist("fixed", switch), K8S: Dist("fixed", switch)}, **kw)


def job(i, submit, runtime, nodes=1, estimate=None) -> Job:
    return Job(i, submit, runtime, nodes, runtime if estimate is None else estimate)


def pod(i, arrival, duration, cores=1) -> Pod:
    return Pod(i, arrival, duration, cores * 1000, cores << 30, 0)


ONE_SHARED_IN_K8S = Cluster(slurm_nodes=0, k8s_nodes=0, shared_nodes=1, static_k8s=1, cpus=4, memory_gb=16)
ONE_SHARED_IN_SLURM = Cluster(slurm_nodes=0, k8s_nodes=0, shared_nodes=1, static_k8s=0, cpus=4, memory_gb=16)


# --------------------------------------------------------------------------- one job, one pod, one node


def test_one_job_one_shared_node_in_kubernetes():
    jobs = [job(1, 10, 100)]
    # provisioner (no persistence, no cooldown): the pass at 60 moves the node, 30 s switch, the job starts at 90.
    r = simulate("provisioner", ONE_SHARED_IN_K8S, jobs, [], settings())
    assert r.job_waits == [80]
    assert r.switches == {SLURM: 1, K8S: 0} and r.switch_hours[SLURM] == pytest.approx(30 / 3600)
    assert r.flaps == {SLURM: 0, K8S: 0} and r.decide_calls == 1
    # the paper's rule does the same here
    assert simulate("paper", ONE_SHARED_IN_K8S, jobs, [], settings()).job_waits == [80]
    # the bound: one pool, no switch time: at once
    assert simulate("bound", ONE_SHARED_IN_K8S, jobs, [], settings()).job_waits == [0]
    # static: SLURM has no node at all: the job never starts (and usable() leaves it out)
    static = simulate("static", ONE_SHARED_IN_K8S, jobs, [], settings())
    assert static.job_waits == [] and static.unfinished[SLURM] == 1
    assert engine.usable(ONE_SHARED_IN_K8S, jobs, [])[2]["jobs_too_wide"] == 1


def test_demand_must_persist_before_the_node_moves():
    # demand_persist_s=120: first seen at the 60 s pass, 60 s old at 120, 120 s old at 180: moved
    # then, switched at 210: the job waited 200 s.
    slow = Policy(min_nodes={SLURM: 0, K8S: 0}, cooldown_s=0, demand_persist_s=120)
    assert simulate("provisioner", ONE_SHARED_IN_K8S, [job(1, 10, 100)], [], settings(slow)).job_waits == [200]


def test_one_pod_one_shared_node_in_slurm():
    r = simulate("provisioner", ONE_SHARED_IN_SLURM, [], [pod(1, 0, 50)], settings())
    assert r.pod_waits == [90]  # pass at 60, switched at 90
    assert r.switches == {SLURM: 0, K8S: 1}
    assert r.util[K8S] == pytest.approx(50 * 1 / (4 * (140 - 90)))  # 1 of 4 cores for 50 s, 50 s in Kubernetes


# --------------------------------------------------------------------------- contention


def test_contention_the_busy_node_moves_only_when_its_job_is_done():
    # The node starts in SLURM: the job takes it at 0 for 1000 s; the pod waits. Busy nodes never
    # move; the job ends at 1000, the pass at 1020 moves the node, switched at 1050.
    jobs, pods = [job(1, 0, 1000)], [pod(1, 0, 100)]
    for kind in ("provisioner", "paper"):
        r = simulate(kind, ONE_SHARED_IN_SLURM, jobs, pods, settings())
        assert (r.job_waits, r.pod_waits) == ([0], [1050]), kind
        assert r.switches == {SLURM: 0, K8S: 1}
    # the bound: the pod takes the node the moment the job is done
    assert simulate("bound", ONE_SHARED_IN_SLURM, jobs, pods, settings()).pod_waits == [1000]


# --------------------------------------------------------------------------- a flap the cooldown prevents

FLAPPY = Cluster(slurm_nodes=1, k8s_nodes=0, shared_nodes=1, static_k8s=0, cpus=4, memory_gb=16)
# Job A holds the fixed SLURM node 0-300. A pod at 0 gets the idle shared node (pass at 60,
# switched at 70, done at 90). Job B comes at 100.
FLAP_JOBS = [job(1, 0, 300), job(2, 100, 100)]
FLAP_PODS = [pod(1, 0, 20)]


def test_without_cooldown_the_node_flaps_back():
    r = simulate("provisioner", FLAPPY, FLAP_JOBS, FLAP_PODS, settings(switch=10))
    # The pass at 120 moves the shared node back (switched at 130): 50 s after its last switch.
    assert sorted(r.job_waits) == [0, 30] and r.pod_waits == [70]
    assert r.switches == {SLURM: 1, K8S: 1} and r.flaps == {SLURM: 1, K8S: 0}


def test_the_cooldown_keeps_a_node_home_after_it_came_back():
    # The node's home is SLURM: job B takes it back at the 120 pass although it switched at 60
    # (the home side's claim ignores the cooldown). A pod at 150 may not borrow it again before
    # 120 + 600 = 720 (switched at 730); without the cooldown, after job B (ends 230): at 240.
    pods = FLAP_PODS + [pod(2, 150, 20)]
    cool = Policy(min_nodes={SLURM: 0, K8S: 0}, cooldown_s=600, demand_persist_s=0)
    r = simulate("provisioner", FLAPPY, FLAP_JOBS, pods, settings(cool, switch=10))
    assert sorted(r.job_waits) == [0, 30] and r.pod_waits == [70, 580]
    r = simulate("provisioner", FLAPPY, FLAP_JOBS, pods, settings(switch=10))
    assert sorted(r.job_waits) == [0, 30] and r.pod_waits == [70, 100]


def test_a_flap_outside_the_window_is_not_one():
    r = simulate("provisioner", FLAPPY, FLAP_JOBS, FLAP_PODS, settings(switch=10, flap_window_s=40))
    assert r.flaps == {SLURM: 0, K8S: 0}


# --------------------------------------------------------------------------- the schedulers


def test_easy_backfilling():
    two = Cluster(slurm_nodes=2, k8s_nodes=0, shared_nodes=0)
    jobs = [job(1, 0, 100), job(2, 1, 100, nodes=2), job(3, 2, 50), job(4, 3, 200)]
    r = simulate("static", two, jobs, [], settings())
    # 3 ends (52) before the head's reservation (100): backfilled at 2; 4 would delay the head.
    assert r.job_waits == [0, 0, 99, 197]
    assert r.util[SLURM] == pytest.approx((100 + 200 + 50 + 200) / (2 * 400))


def test_kubernetes_fifo_first_fit_does_not_block_behind_a_big_pod():
    one = Cluster(slurm_nodes=0, k8s_nodes=1, shared_nodes=0, cpus=4, memory_gb=16)
    r = simulate("static", one, [], [pod(1, 0, 100, 3), pod(2, 1, 100, 2), pod(3, 2, 100, 1)], settings())
    assert r.pod_waits == [0, 0, 99]  # the 1-core pod fits beside the first at once; the 2-core one waits


def test_provisioner_beats_the_static_split_on_a_contended_trace():
    cl = Cluster(slurm_nodes=2, k8s_nodes=2, shared_nodes=4, cpus=4, memory_gb=16)
    jobs = [job(i, i * 400.0, 3000, nodes=1 + i % 3) for i in range(40)]
    pods = [pod(i, 20000 + i * 900.0, 600, 2) for i in range(20)]
    rows = {k: simulate(k, cl, jobs, pods, settings()) for k in engine.POLICIES}
    mean = {k: sum(r.job_waits) / len(r.job_waits) for k, r in rows.items()}
    assert mean["provisioner"] < mean["static"] and mean["bound"] <= mean["static"]
    assert rows["static"].switches == {SLURM: 0, K8S: 0}
    assert all(r.unfinished == {SLURM: 0, K8S: 0} for r in rows.values())


# --------------------------------------------------------------------------- the readers

SWF = """; Version: 2
; MaxNodes: 4
; MaxProcs: 16
1 0 -1 100 8 -1 -1 8 200 -1 1 1 1 -1 1 -1 -1 -1
2 50 -1 -1 4 -1 -1 4 -1 -1 5 1 1 -1 1 -1 -1 -1
3 60 -1 30 -1 -1 -1 3 -1 -1 1 1 1 -1 1 -1 -1 -1
"""


def test_swf_fields_and_header():
    t = swf.parse(SWF.splitlines(), "t.swf")
    assert t.procs_per_node == 4 and t.max_nodes == 4
    assert t.jobs == [Job(1, 0, 100, 2, 200), Job(3, 60, 30, 1, 30)]  # 8 procs = 2 nodes; 3 procs requested
    assert t.skipped_unusable == 1  # job 2: no run time (cancelled)


def test_a_malformed_swf_line_is_named_or_skipped(tmp_path):
    bad = tmp_path / "bad.swf"
    bad.write_text(SWF + "4 70 -1 10 1\n5 80 -1 x 1 -1 -1 1 -1 -1 1 1 1 -1 1 -1 -1 -1\n")
    with pytest.raises(swf.SwfError, match=r"bad\.swf: line 7: malformed SWF job line \(5 fields"):
        swf.load(bad)
    t = swf.load(bad, skip_bad=True)
    assert t.skipped_malformed == 2 and len(t.jobs) == 2


def test_pod_csv(tmp_path):
    f = tmp_path / "pods.csv"
    f.write_text("arrival,duration,cpu,memory,gpus\n10,60,0.5,2,0\n0,30,2,,\n")
    assert podsmod.load_csv(f) == [Pod(1, 0, 30, 2000, 0, 0), Pod(0, 10, 60, 500, 2 << 30, 0)]
    f.write_text("arrival,duration,cpu\n10,60,-1\n")
    with pytest.raises(podsmod.PodTraceError, match=r"pods\.csv: line 2: malformed pod line"):
        podsmod.load_csv(f)
    f.write_text("when,cpu\n")
    with pytest.raises(podsmod.PodTraceError, match="missing arrival, duration"):
        podsmod.load_csv(f)


def test_the_generator_is_seeded_and_offers_the_load():
    a = podsmod.generate(2000, 10 * 86400, 1024, load=0.5, seed=7)
    assert a == podsmod.generate(2000, 10 * 86400, 1024, load=0.5, seed=7) != podsmod.generate(2000, 10 * 86400, 1024, seed=8)
    assert len(a) == 2000 and all(0 <= p.arrival <= 10 * 86400 for p in a)
    offered = sum(p.cpu_m / 1000 * p.duration for p in a) / (1024 * 10 * 86400)
    assert 0.4 < offered < 0.6


# --------------------------------------------------------------------------- the command

TRACE = "".join(f"{i} {i * 300} -1 {600 + 200 * (i % 4)} {1 + i % 3} -1 -1 -1 -1 -1 1 -1 -1 -1 0 -1 -1 -1\n"
                for i in range(1, 61))
SMALL = ["--slurm-nodes", "2", "--k8s-nodes", "1", "--shared-nodes", "2", "--node-cpus", "8", "--pod-load", "0.8"]


def test_the_command_prints_four_rows_and_writes_the_plots(tmp_path, capsys):
    require_module("matplotlib")
    trace = tmp_path / "tiny.swf"
    trace.write_text("; MaxNodes: 4\n" + TRACE)
    assert main(["simulate", "--slurm-trace", str(trace), *SMALL, "--plots", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    assert [line.split()[0] for line in lines[header + 1:header + 5]] == list(engine.POLICIES)
    for name in ("nodes", "queues", "waits"):
        assert (tmp_path / "out" / f"simulate-{name}.png").stat().st_size > 1000


def test_the_command_json_and_a_sweep(tmp_path, capsys):
    trace = tmp_path / "tiny.swf"
    trace.write_text(TRACE)
    assert main(["simulate", "--slurm-trace", str(trace), *SMALL, "--no-plots", "--json",
                 "--sweep", "cooldown_s=0,300,600", "--switch-time", "to-k8s=uniform:60:70"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in data["rows"]] == ["static", "paper", "provisioner cooldown_s=0",
                                                   "provisioner cooldown_s=300", "provisioner cooldown_s=600", "bound"]
    assert [r["knobs"]["cooldown_s"] for r in data["rows"][2:5]] == [0, 300, 600]
    assert data["switch_time"] == {"slurm": "uniform 37.7-37.9 s", "k8s": "uniform 60-70 s"}
    assert data["rows"][0]["jobs"]["count"] == 60 and set(data["rows"][0]["jobs"]) >= {"mean_s", "median_s", "p95_s"}


def test_a_malformed_trace_exits_2_naming_the_file_and_the_line(tmp_path, capsys):
    trace = tmp_path / "broken.swf"
    trace.write_text(TRACE + "61 9000 -1 100\n")
    assert main(["simulate", "--slurm-trace", str(trace), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"{trace}: line 61: malformed SWF job line" in err and len(err.strip().splitlines()) == 1
    assert main(["simulate", "--slurm-trace", str(tmp_path / "missing.swf"), "--no-plots"]) == 2
    assert "missing.swf: cannot read the SLURM trace" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--set", "cooldown=5"], "unknown policy knob 'cooldown'"),
    (["--sweep", "max_in_flight=0"], "max_in_flight: must be at least 1"),
    (["--switch-time", "gamma:1:2"], "--switch-time 'gamma:1:2'"),
    (["--policies", "static,best"], "--policies: unknown best"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    trace = tmp_path / "tiny.swf"
    trace.write_text(TRACE)
    assert main(["simulate", "--slurm-trace", str(trace), "--no-plots", *argv]) == 2
    assert message in capsys.readouterr().err


def test_without_matplotlib_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.MissingDependency, match=r"pip install 'provisioner\[simulate\]'"):
        report.pyplot()


def test_skipping_decide_when_it_cannot_move_anything_changes_nothing(monkeypatch):
    rnd = __import__("random").Random(3)
    cl = Cluster(slurm_nodes=3, k8s_nodes=1, shared_nodes=5, cpus=8, memory_gb=32)
    jobs = [job(i, rnd.uniform(0, 40000), rnd.uniform(60, 6000), rnd.choice([1, 1, 2, 4])) for i in range(120)]
    jobs.sort(key=lambda j: j.submit)
    pods = podsmod.generate(120, 40000, 16, load=0.9, seed=3, node_cores=8)
    for pol in (EAGER, Policy(min_nodes={SLURM: 1, K8S: 0}, cooldown_s=600, demand_persist_s=120, max_in_flight=1),
                replace(EAGER, lending_limit={SLURM: 1, K8S: 1}, reclaim_grace_s={SLURM: 600, K8S: 120})):
        skipped = engine.Simulation("provisioner", cl, jobs, pods, settings(pol)).run()
        monkeypatch.setattr(engine.Simulation, "always_decide", True)
        every = engine.Simulation("provisioner", cl, jobs, pods, settings(pol)).run()
        monkeypatch.setattr(engine.Simulation, "always_decide", False)
        assert every.decide_calls > skipped.decide_calls
        assert (skipped.job_waits, skipped.pod_waits, skipped.switches, skipped.flaps, skipped.released) == \
            (every.job_waits, every.pod_waits, every.switches, every.flaps, every.released)
        assert sum(skipped.switches.values()) > 0


def test_knobs_from_a_site_and_a_pod_trace(tmp_path, capsys):
    trace = tmp_path / "tiny.swf"
    trace.write_text(TRACE)
    pods_csv = tmp_path / "pods.csv"
    pods_csv.write_text("arrival,duration,cpu,memory,gpus\n" + "".join(f"{i * 500},900,4,8,0\n" for i in range(30)))
    assert main(["simulate", "--slurm-trace", str(trace), *SMALL, "--no-plots", "--json", "--policies", "provisioner",
                 "--site", str(Path(__file__).resolve().parent.parent / "examples" / "site.yaml"), "--set", "cooldown_s=60",
                 "--pod-trace", str(pods_csv)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["provisioner_knobs"] == {"cooldown_s": 60, "demand_persist_s": 120, "max_in_flight": 2,
                                         "share_rule": "proportional", "min_nodes": {"slurm": 1, "k8s": 0},
                                         "reclaim_grace_s": {"slurm": 1800, "k8s": 300},
                                         "lending_limit": {"slurm": None, "k8s": None}, "reclaim_requeue": "cheaper"}
    assert data["pods"]["pods"] == 30 and data["rows"][0]["pods"]["count"] == 30
