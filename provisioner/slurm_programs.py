"""What slurmctld's power-saving programs do: `provisioner slurm resume|suspend|resume-fail HOSTLIST`.

slurmctld runs ResumeProgram the moment it gives a job "powered down" nodes, SuspendProgram
after SuspendTime idle, ResumeFailProgram when a node missed ResumeTimeout. It waits for them,
and runs them with almost no environment (no PATH; SLURM_CONF may be missing). So each one only
records the ask in the store (one transaction), wakes the reconciler, and returns: the policy
answers the ask on the next pass, and the switch runs there, never here.

Waking: a running `provisioner run` notices the new ask within its ask_poll_s; without one (cron
sites), a detached `provisioner balance --wait` pass is started (it waits for a running pass,
then answers the ask; cron's next pass is the safety net).

slurm.conf cannot pass arguments to these programs, so `provisioner slurm programs --dir DIR`
writes three small wrapper scripts that call this interpreter with this config, and prints the
slurm.conf lines that go with them (examples/slurm/).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import UsageError
from provisioner.model import Site
from provisioner.nodeset import expand, fold
from provisioner.store import Store

SOURCE = "slurmctld"
KINDS = {"resume": "resume", "suspend": "suspend", "resume-fail": "resume-fail"}
PROGRAMS = {"resume": "ResumeProgram", "suspend": "SuspendProgram", "resume-fail": "ResumeFailProgram"}
# What a program started by slurmctld gets when it has no PATH (scontrol, the BMC tools).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WAKE_WAIT_S = 120  # a woken pass waits this long for a running pass to finish


@dataclass
class Recorded:
    kind: str
    nodes: list[str]  # shared nodes, asks recorded
    ignored: list[str]  # not shared: SLURM's own business
    woke: str  # how the reconciler was told


def jobs_by_node(resume_file: str | None) -> dict[str, list[str]]:
    """SLURM_RESUME_FILE (22.05+): {"jobs": [{"job_id": 12, "nodes": "sn[01-02]"}, ...]} ->
    node -> job ids. Unreadable or malformed: {} (the ask still counts; only its reason is shorter)."""
    if not resume_file:
        return {}
    try:
        data = json.loads(Path(resume_file).read_text())
        out: dict[str, list[str]] = defaultdict(list)
        for job in data.get("jobs") or []:
            for n in expand(str(job.get("nodes") or "")):
                out[n].append(str(job.get("job_id")))
        return dict(out)
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def record(site: Site, store: Store, command: str, hostlist: str, env: dict[str, str] | None = None) -> Recorded:
    """Record slurmctld's ask for each shared node of `hostlist`, then wake the reconciler."""
    env = os.environ if env is None else env
    kind = KINDS[command]
    try:
        names = expand(hostlist)
    except ValueError as exc:
        raise UsageError(f"not a hostlist: {hostlist!r} ({exc})") from None
    shared = [n for n in names if n in site.nodes and site.nodes[n].shared]
    ignored = [n for n in names if n not in shared]
    jobs = jobs_by_node(env.get("SLURM_RESUME_FILE")) if kind == "resume" else {}
    program = PROGRAMS[command]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for n in shared:
        reason = f"{program}" + (f" for JobId={','.join(jobs[n])}" if jobs.get(n) else "")
        by_reason[reason].append(n)
    for reason, nodes in by_reason.items():
        store.add_asks(nodes, kind, source=SOURCE, reason=reason, actor=SOURCE)
    woke = wake(site) if shared else "nothing to do"
    return Recorded(kind, shared, ignored, woke)


def wake(site: Site) -> str:
    """Make a pass answer the new asks soon: the daemon will; else start one, detached."""
    from provisioner import runner

    if runner.daemon_running(site):
        runner.notify(site)
        return "provisioner run will answer"
    env = {**os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    log = Path(str(site.store) + ".asks.log")
    argv = [sys.executable, "-m", "provisioner", "--config", str(site.path), "balance", "--wait", str(WAKE_WAIT_S)]
    with open(log, "ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True,
                         cwd="/")
    return f"started a balance pass (log {log})"


# ----------------------------------------------------------------------------- the wrappers

WRAPPER = """#!/bin/sh
# slurm.conf {program} for provisioner: written by `provisioner slurm programs`; runs
# `provisioner slurm {command} HOSTLIST` with this site's config (slurmctld passes no arguments
# but the hostlist, and no PATH).
PATH={path}; export PATH
exec {python} -m provisioner --config {config} slurm {command} "$@"
"""


def write_programs(site: Site, folder: Path) -> dict[str, Path]:
    """The three wrapper scripts, executable, in `folder`: {command: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for command, program in PROGRAMS.items():
        path = folder / f"provisioner-slurm-{command}"
        path.write_text(WRAPPER.format(program=program, command=command, path=DEFAULT_PATH,
                                       python=shlex.quote(sys.executable), config=shlex.quote(str(site.path))))
        path.chmod(0o755)
        out[command] = path
    return out


def slurm_conf_lines(site: Site, programs: dict[str, Path]) -> list[str]:
    """The slurm.conf lines for these programs, with ResumeTimeout sized to our switch."""
    p = site.policy
    shared = [n.name for n in site.nodes.values() if n.shared]
    fixed = [n.name for n in site.nodes.values() if not n.shared]
    # A switch to SLURM: cordon + evictions (one phase), then boot and join, retried max_retries
    # times: slurmctld must wait at least that long, or it gives up on a node still coming.
    resume_timeout = p.phase_timeout_s * (2 + p.max_retries) + 60
    lines = [
        f"ResumeProgram={programs['resume']}",
        f"SuspendProgram={programs['suspend']}",
        f"ResumeFailProgram={programs['resume-fail']}",
        f"ResumeTimeout={resume_timeout}   # >= our switch: phase_timeout_s x (2 + max_retries) + 60",
        "SuspendTime=600   # idle seconds before SLURM gives a shared node back (pick yours)",
        "SuspendTimeout=30",
        "ResumeRate=0",
        "SuspendRate=0",
    ]
    if fixed:
        lines.append(f"SuspendExcNodes={fold(fixed)}   # only the shared nodes are power-managed")
    lines.append(f"# and in the site config: slurm: {{power_saving: true}}  (shared nodes: {fold(shared)})")
    return lines
