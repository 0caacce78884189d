"""Kubernetes pod load: a CSV trace, or a synthetic generator with a seed.

The CSV has a header line naming the columns `arrival,duration,cpu,memory,gpus` (any order,
extra columns ignored; memory and gpus may be left out): arrival and duration in seconds, cpu in
cores (0.5 = 500m), memory in GiB, gpus a whole number. Arrivals are on the SLURM trace's clock
as the simulator uses it: seconds since the trace's first job.

The generator (`generate`): `count` pods over `span_s` seconds,
- arrivals: a Poisson process whose rate follows a day: rate(t) = mean * (1 + 0.8 sin(2 pi (t -
  6 h) / 24 h)), highest at noon of each simulated day, lowest at midnight (interactive and
  training work comes in by day);
- sizes: 4, 8, 16 or 32 cores with equal probability (clipped to the node's cores), 4 GiB of
  memory per core, no GPUs;
- durations: exponential, with the mean that makes the offered load `load` x `capacity_cores`
  over the span (the mean pod then runs for hours: comparable to the HPC jobs, not web requests).
The same seed always gives the same pods.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import UsageError

GIB = 1 << 30
DAY = 86400.0


class PodTraceError(UsageError):
    """A pod trace that cannot be read; names the file and the line."""


@dataclass(frozen=True)
class Pod:
    id: int
    arrival: float
    duration: float
    cpu_m: int  # millicores
    memory: int  # bytes
    gpus: int = 0


def parse_csv(lines, path: str = "<pods>") -> list[Pod]:
    reader = csv.reader(lines)
    header = None
    pods: list[Pod] = []
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            missing = {"arrival", "duration", "cpu"} - set(header)
            if missing:
                raise PodTraceError(f"{path}: line {lineno}: the header must name the columns arrival, duration, "
                                    f"cpu (and optionally memory, gpus); missing {', '.join(sorted(missing))}")
            continue
        rec = dict(zip(header, (c.strip() for c in row)))
        try:
            if len(row) < len(header):
                raise ValueError(f"{len(row)} columns, the header has {len(header)}")
            arrival, duration, cpu = float(rec["arrival"]), float(rec["duration"]), float(rec["cpu"])
            memory = float(rec.get("memory") or 0)
            gpus = int(rec.get("gpus") or 0)
            values = (arrival, duration, cpu, memory)
            if not all(math.isfinite(v) for v in values) or min(values) < 0 or gpus < 0:
                raise ValueError("negative or not a finite number")
        except ValueError as exc:
            raise PodTraceError(f"{path}: line {lineno}: malformed pod line ({exc}): {','.join(row)[:80]!r}") from None
        pods.append(Pod(len(pods), arrival, duration, max(1, round(cpu * 1000)), int(memory * GIB), gpus))
    pods.sort(key=lambda p: (p.arrival, p.id))
    return pods


def load_csv(path: str | Path) -> list[Pod]:
    try:
        with Path(path).open(newline="", encoding="utf-8", errors="replace") as f:
            return parse_csv(f, str(path))
    except OSError as exc:
        raise PodTraceError(f"{path}: cannot read the pod trace: {exc.strerror or exc}") from None


SIZES = (4, 8, 16, 32)  # cores, equally likely
AMPLITUDE = 0.8


def generate(count: int, span_s: float, capacity_cores: float, load: float = 0.5, seed: int = 1,
             node_cores: int = 32) -> list[Pod]:
    """`count` synthetic pods (see the module's docstring)."""
    if count <= 0 or span_s <= 0:
        return []
    rng = random.Random(seed)
    sizes = [min(s, node_cores) for s in SIZES]
    mean_cores = sum(sizes) / len(sizes)
    mean_duration = load * capacity_cores * span_s / (count * mean_cores)
    rate = count / span_s
    peak = rate * (1 + AMPLITUDE)
    pods: list[Pod] = []
    t = 0.0
    while len(pods) < count:  # thinning (Lewis-Shedler): a homogeneous process at the peak rate
        t += rng.expovariate(peak)
        if t > span_s:
            t = 0.0 if not pods else t - span_s  # wrap: keeps exactly `count` pods within the span
        if rng.random() * peak > rate * (1 + AMPLITUDE * math.sin(2 * math.pi * (t - DAY / 4) / DAY)):
            continue
        cores = rng.choice(sizes)
        pods.append(Pod(0, t, rng.expovariate(1 / mean_duration), cores * 1000, cores * 4 * GIB, 0))
    pods.sort(key=lambda p: p.arrival)
    return [Pod(i, p.arrival, p.duration, p.cpu_m, p.memory, p.gpus) for i, p in enumerate(pods)]
