"""Parsers of the SLURM adapter, on outputs captured from a real Slurm 22.05.8 cluster
(tests/data/slurm/, re-captured by `python -m tests.data.slurm.capture`). No daemon needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.clusters.slurm import (
    PAPER_REASON,
    node_fields,
    parse_nodes,
    parse_pending,
    parse_state,
)

DATA = Path(__file__).parent / "data" / "slurm"
PREFIX = "provisioner:"
MOMENTS = ("busy", "after", "power-down-asked", "powering-down", "powered-down", "powering-up")
T = 1795476752.0  # when the capture drained/downed the nodes (SLURM_TIME_FORMAT=%s)


def read(moment: str, what: str) -> str:
    return (DATA / f"{moment}.{what}.txt").read_text()


def nodes(moment: str):
    return parse_nodes(read(moment, "scontrol-show-node"), PREFIX)


def test_busy_nodes_every_kind():
    n = nodes("busy")
    assert list(n) == ["cn1", "cn2", "sn1", "sn2", "sn3"]

    assert (n["cn1"].state, n["cn1"].flags, n["cn1"].alloc_cpus, n["cn1"].cpus) == ("allocated", frozenset(), 2, 2)
    assert n["cn1"].busy and n["cn1"].available and not n["cn1"].drain and n["cn1"].reason is None
    assert (n["cn2"].state, n["cn2"].alloc_cpus) == ("mixed", 1) and n["cn2"].busy

    sn1 = n["sn1"]  # drained by us while its job runs
    assert (sn1.state, sn1.flags) == ("allocated", frozenset({"drain"}))
    assert sn1.draining and not sn1.drained and not sn1.available
    assert sn1.reason == "provisioner: to k8s (3 pods Pending)" and sn1.reason_is_ours and not sn1.held_by_other
    assert (sn1.reason_user, sn1.reason_time) == ("root", T)

    sn2 = n["sn2"]  # drained by an admin: spaces, a pipe, a bracket, and Comment=/Extra= after it
    assert sn2.drained and not sn2.draining
    assert sn2.reason == "bad DIMM | replace on Tuesday  [ticket 42]"
    assert not sn2.reason_is_ours and sn2.held_by_other
    assert sn2.reason_time == T

    sn3 = n["sn3"]  # the paper's down reason counts as ours
    assert sn3.down and sn3.reason == PAPER_REASON and sn3.reason_is_ours and not sn3.held_by_other

    for name in ("sn1", "sn2", "sn3"):
        assert (n[name].gpus, n[name].partitions, n[name].memory_mb) == (2, ("batch", "gpu"), 500)
    assert (n["cn1"].gpus, n["cn1"].partitions) == (0, ("batch",))
    assert all(node.responding and node.slurmd_start_time and node.boot_time for node in n.values())


def test_free_text_after_the_reason_stays_out_of_it():
    line = next(l for l in read("busy", "scontrol-show-node").splitlines() if l.startswith("NodeName=sn2"))
    f = node_fields(line)
    assert f["Reason"] == "bad DIMM | replace on Tuesday  [ticket 42]"
    assert f["Comment"] == "rack 12, slot 3"
    assert f["Extra"] == "owner=ops team"
    assert f["OS"].startswith("Linux ") and "#1 SMP" in f["OS"]
    assert f["State"] == "IDLE+DRAIN"


def test_after_drained_and_not_responding():
    n = nodes("after")
    assert n["sn1"].drained and n["sn1"].reason_is_ours
    cn2 = n["cn2"]  # its slurmd was stopped while a job ran there
    assert (cn2.state, cn2.flags) == ("mixed", frozenset({"not_responding"}))
    assert not cn2.responding and not cn2.available and cn2.busy


@pytest.mark.parametrize("moment, flag, suffix", [
    ("power-down-asked", "power_down", "!"),
    ("powering-down", "powering_down", "%"),
    ("powered-down", "powered_down", "~"),
    ("powering-up", "powering_up", "#"),
])
def test_power_saving_states(moment, flag, suffix):
    cn1 = nodes(moment)["cn1"]
    assert cn1.state == "idle" and flag in cn1.flags and not cn1.available
    sinfo = dict(line.split("|", 2)[:2] for line in read(moment, "sinfo").splitlines() if not line.startswith("#"))
    assert sinfo["cn1"] == f"idle{suffix}"  # what the admin sees in sinfo for the same moment


def test_slurms_own_not_responding_reason_is_not_ours():
    cn2 = nodes("powering-up")["cn2"]
    assert cn2.down and not cn2.responding
    assert cn2.reason == "Not responding" and not cn2.reason_is_ours and cn2.held_by_other


@pytest.mark.parametrize("moment", MOMENTS)
def test_scontrol_agrees_with_sinfo_of_the_same_moment(moment):
    """sinfo's compact state (suffixes * ~ # % !) and its %E reason, read with parse_state, say
    the same as our parse of scontrol's full output."""
    n = nodes(moment)
    checked = 0
    for line in read(moment, "sinfo").splitlines():
        if line.startswith("#"):
            continue
        name, compact, reason = line.split("|", 2)
        base, flags = parse_state(compact)
        node = n[name]
        assert flags <= node.flags, (line, node)
        assert base == node.state or compact.rstrip("*~#%!") in ("drained", "draining"), (line, node)
        assert (None if reason == "none" else reason) == node.reason, line
        checked += 1
    assert checked >= len(n)


@pytest.mark.parametrize("text, base, flags", [
    ("IDLE", "idle", set()),
    ("IDLE+DRAIN", "idle", {"drain"}),
    ("ALLOCATED+DRAIN", "allocated", {"drain"}),
    ("DOWN+DRAIN+NOT_RESPONDING", "down", {"drain", "not_responding"}),
    ("IDLE+CLOUD+POWERED_DOWN", "idle", {"cloud", "powered_down"}),
    ("MIXED+COMPLETING", "mixed", {"completing"}),
    ("idle*", "idle", {"not_responding"}),
    ("idle~", "idle", {"powered_down"}),
    ("idle#", "idle", {"powering_up"}),
    ("idle%", "idle", {"powering_down"}),
    ("down*", "down", {"not_responding"}),
    ("drained*", "idle", {"drain", "not_responding"}),
    ("draining", "allocated", {"drain"}),
    ("mixed", "mixed", set()),
])
def test_parse_state(text, base, flags):
    assert parse_state(text) == (base, frozenset(flags))


def test_reason_without_timestamp_and_later_keys():
    # Reason without the [user@time] part, and a key after it (later Slurm versions add some).
    line = ("NodeName=x1 CPUAlloc=0 CPUTot=4 State=DOWN ThreadsPerCore=1 Partitions=p1 "
            "Reason=power cut in row=3 ResumeAfterTime=None")
    n = parse_nodes(line, PREFIX)["x1"]
    assert n.reason == "power cut in row=3" and n.reason_user is None and n.reason_time is None
    assert n.down and n.held_by_other and n.cpus == 4


def test_pending_jobs():
    jobs = {j.job_id: j for j in parse_pending(read("busy", "squeue"))}
    # RUNNING lines are dropped; array tasks are one job each (-r)
    assert sorted(jobs) == sorted(["4", "5", "6", "7", "8_1", "8_2", "8_3", "9", "10"])
    two = jobs["4"]
    assert (two.reason, two.partitions, two.num_nodes, two.num_cpus, two.cpus_per_node) == \
        ("Resources", ("batch",), 2, 4, 2)
    assert (two.user, two.submit_time, two.name, two.partition) == ("root", T, "two nodes", "batch")
    assert two.priority > 0
    assert jobs["6"].reason == "BeginTime" and jobs["7"].reason == "Dependency"
    assert jobs["8_2"].reason == "Priority" and jobs["8_2"].name == "my job | with pipes"
    assert jobs["5"].reason.startswith("ReqNodeNotAvail") and jobs["5"].req_nodes == ("sn2",)
    assert jobs["9"].gpus_per_node == 1 and jobs["9"].partitions == ("gpu",)
    assert jobs["10"].partitions == ("gpu", "batch") and jobs["10"].cpus_per_node == 2
    assert all(j.gpus_per_node == 0 for k, j in jobs.items() if k != "9")


def test_empty_outputs():
    assert parse_nodes("", PREFIX) == {}
    assert parse_pending("") == []
