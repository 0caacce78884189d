"""SLURM job traces in the Standard Workload Format (SWF) of the Parallel Workloads Archive.

A trace is `;` header comments (`; MaxNodes: 256`, `; MaxProcs: 256`, ...) then one job per line
of 18 whitespace-separated numbers, -1 where unknown:

     1 job id   2 submit time (s)   3 wait time   4 run time (s)   5 allocated processors
     6 average CPU time   7 used memory   8 requested processors   9 requested time (s)
    10 requested memory   11 status   12 user   13 group   14 executable   15 queue
    16 partition   17 preceding job   18 think time

What the simulator takes from a job: its submit time, its run time, its size (allocated
processors, or requested ones when the allocation is unknown) and its run-time estimate (the
requested time, or the run time itself when the trace has none: perfect estimates). A job with no
usable run time or size (cancelled before it started, -1 fields) cannot be replayed: it is
skipped and counted. A line that is not 18 numbers is malformed: an error naming the file and the
line (a SwfError, exit 2 on the command line), or skipped and counted with skip_bad=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.errors import UsageError

FIELDS = 18


class SwfError(UsageError):
    """A trace that cannot be read; names the file and the line."""


@dataclass(frozen=True)
class Job:
    id: int
    submit: float  # seconds since the trace's start
    runtime: float
    nodes: int  # whole nodes, exclusive (after procs_per_node)
    estimate: float  # what the scheduler believes the run time is (>= runtime here)


@dataclass
class Trace:
    jobs: list[Job]
    header: dict[str, str] = field(default_factory=dict)
    skipped_unusable: int = 0  # cancelled or unknown size/run time
    skipped_malformed: int = 0
    procs_per_node: int = 1
    path: str = ""

    @property
    def max_nodes(self) -> int | None:
        """The machine's size in nodes, from the header (MaxNodes, else MaxProcs)."""
        for key in ("MaxNodes", "MaxProcs"):
            try:
                return int(self.header[key].split()[0]) // (1 if key == "MaxNodes" else self.procs_per_node)
            except (KeyError, ValueError, IndexError):
                continue
        return None


def _header(line: str, header: dict[str, str]) -> None:
    text = line.lstrip(";").strip()
    if ":" in text:
        key, value = text.split(":", 1)
        if key.strip() and " " not in key.strip():
            header.setdefault(key.strip(), value.strip())


def default_procs_per_node(header: dict[str, str]) -> int:
    """MaxProcs / MaxNodes when the header gives both (processors per node), else 1."""
    try:
        procs, nodes = int(header["MaxProcs"].split()[0]), int(header["MaxNodes"].split()[0])
    except (KeyError, ValueError, IndexError):
        return 1
    return max(1, procs // nodes) if nodes > 0 and procs > 0 else 1


def parse(lines, path: str = "<trace>", procs_per_node: int | None = None, skip_bad: bool = False) -> Trace:
    """Read SWF lines (an iterable of str). Submit times are shifted so the first job is at 0."""
    header: dict[str, str] = {}
    raw: list[tuple[int, float, float, int, float]] = []
    unusable = malformed = 0
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith(";"):
            _header(text, header)
            continue
        parts = text.split()
        try:
            if len(parts) != FIELDS:
                raise ValueError(f"{len(parts)} fields, an SWF job line has {FIELDS}")
            values = [float(p) for p in parts]
            if not all(math.isfinite(v) for v in values):
                raise ValueError("a field is not a finite number")
        except ValueError as exc:
            if skip_bad:
                malformed += 1
                continue
            raise SwfError(f"{path}: line {lineno}: malformed SWF job line ({exc}): {text[:80]!r}") from None
        job_id, submit, runtime, alloc, requested, req_time = (values[0], values[1], values[3], values[4],
                                                             values[7], values[8])
        procs = alloc if alloc > 0 else requested
        if submit < 0 or runtime < 0 or procs <= 0:
            unusable += 1
            continue
        raw.append((int(job_id), submit, runtime, int(procs), req_time))
    ppn = procs_per_node or default_procs_per_node(header)
    raw.sort(key=lambda r: (r[1], r[0]))
    t0 = raw[0][1] if raw else 0.0
    jobs = [Job(id=j, submit=s - t0, runtime=r, nodes=max(1, math.ceil(p / ppn)),
                estimate=max(r, q) if q > 0 else r)
            for j, s, r, p, q in raw]
    return Trace(jobs, header, unusable, malformed, ppn, path)


def load(path: str | Path, procs_per_node: int | None = None, skip_bad: bool = False) -> Trace:
    p = Path(path)
    try:
        with p.open(encoding="utf-8", errors="replace") as f:
            return parse(f, str(path), procs_per_node, skip_bad)
    except OSError as exc:
        raise SwfError(f"{path}: cannot read the SLURM trace: {exc.strerror or exc}") from None
