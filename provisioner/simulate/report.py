"""What a simulation run shows: rows (one per policy, or per swept value), a terminal table, JSON,
and PNG plots (matplotlib, Agg backend, an optional dependency: `pip install 'provisioner[simulate]'`).
"""

from __future__ import annotations

from pathlib import Path

from provisioner.errors import ProvisionerError
from provisioner.simulate.engine import Result, wait_stats
from provisioner.states import K8S, SLURM

INSTALL_HINT = "pip install 'provisioner[simulate]'"


class MissingDependency(ProvisionerError):
    """An optional library is not installed; says what to install."""


def row(label: str, r: Result) -> dict:
    return {
        "policy": label,
        "knobs": r.knobs,
        "jobs": {**wait_stats(r.job_waits), "utilisation": round(r.util[SLURM], 4)},
        "pods": {**wait_stats(r.pod_waits), "utilisation": round(r.util[K8S], 4)},
        "utilisation_all": round(r.util["all"], 4),
        "switches": r.switches,  # switches TO each side
        "switch_node_hours": {s: round(v, 3) for s, v in r.switch_hours.items()},
        "flaps": r.flaps,  # moved back to this side within the flap window
        "never_started": r.unfinished,
        "end_s": round(r.end, 1),
        "decide_calls": r.decide_calls,
        "reclaims": r.reclaims,  # busy nodes taken home, by the side that took them
        "reclaims_released": r.released,  # of those, rolled back within the grace: nothing moved
        "reclaims_waited": r.waited,  # of those, waited for their job to end rather than requeue it
        "lost_work": {"jobs_requeued": r.requeued, "job_node_hours": round(r.lost_job_node_h, 3),
                      "pods_evicted": r.evicted, "pod_hours": round(r.lost_pod_h, 3)},
    }


def human(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


HEADERS = ["policy", "job wait mean", "p95", "p99", "longest", "pod wait mean", "p95", "p99", "longest",
           "util slurm", "util k8s", "switches s/k", "switch node-h", "flaps s/k", "reclaims s/k",
           "released", "waited", "lost job node-h", "lost pod-h"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        j, p = r["jobs"], r["pods"]
        out.append([
            r["policy"], human(j["mean_s"]), human(j["p95_s"]), human(j["p99_s"]), human(j["max_s"]),
            human(p["mean_s"]), human(p["p95_s"]), human(p["p99_s"]), human(p["max_s"]),
            f"{j['utilisation']:.1%}", f"{p['utilisation']:.1%}",
            f"{r['switches'][SLURM]}/{r['switches'][K8S]}",
            f"{sum(r['switch_node_hours'].values()):.1f}",
            f"{r['flaps'][SLURM]}/{r['flaps'][K8S]}",
            f"{r['reclaims'][SLURM]}/{r['reclaims'][K8S]}", str(r["reclaims_released"]),
            str(r["reclaims_waited"]),
            f"{r['lost_work']['job_node_hours']:.1f}", f"{r['lost_work']['pod_hours']:.1f}",
        ])
    return out


def format_table(rows: list[dict]) -> str:
    cells = table_rows(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(HEADERS, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    cells = table_rows(rows)
    lines = ["| " + " | ".join(HEADERS) + " |", "| --- |" + " ---: |" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency(f"the plots need matplotlib: {INSTALL_HINT} (or leave them out: --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results: list[tuple[str, Result]], out_dir: str | Path, prefix: str = "simulate") -> list[Path]:
    """nodes per side over time, queue lengths over time (one panel per policy), and the wait
    time CDFs of every policy (jobs, pods). Returns the files written."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    n = len(results)

    fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n + 0.6), sharex=True, squeeze=False)
    for ax, (label, r) in zip(axes[:, 0], results):
        t = [s[0] / 86400 for s in r.samples]
        ax.stackplot(t, [s[1] for s in r.samples], [s[3] for s in r.samples], [s[2] for s in r.samples],
                     labels=["SLURM", "switching", "Kubernetes"], colors=["#4477aa", "#bbbbbb", "#ee6677"], step="post")
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_ylabel("nodes", fontsize=8)
    axes[0, 0].legend(loc="lower right", fontsize=7, ncols=3)
    axes[-1, 0].set_xlabel("simulated days")
    fig.suptitle("Nodes per side over time")
    fig.tight_layout()
    written.append(_save(fig, plt, out / f"{prefix}-nodes.png"))

    fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n + 0.6), sharex=True, squeeze=False)
    for ax, (label, r) in zip(axes[:, 0], results):
        t = [s[0] / 86400 for s in r.samples]
        ax.step(t, [s[4] for s in r.samples], where="post", label="pending jobs", color="#4477aa", lw=0.8)
        ax.step(t, [s[5] for s in r.samples], where="post", label="pending pods", color="#ee6677", lw=0.8)
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_ylabel("queued", fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("simulated days")
    fig.suptitle("Queue lengths over time")
    fig.tight_layout()
    written.append(_save(fig, plt, out / f"{prefix}-queues.png"))

    written.append(plot_cdfs(results, out / f"{prefix}-waits.png", plt))
    return written


def plot_cdfs(results: list[tuple[str, Result]], path: Path, plt=None) -> Path:
    plt = plt or pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, side, attr in ((axes[0], "SLURM jobs", "job_waits"), (axes[1], "Kubernetes pods", "pod_waits")):
        for label, r in results:
            waits = sorted(getattr(r, attr))
            if not waits:
                continue
            xs = [max(w, 1.0) / 3600 for w in waits]  # log axis: a zero wait is drawn at 1 s
            ys = [(i + 1) / len(waits) for i in range(len(waits))]
            ax.step(xs, ys, where="post", label=label, lw=1.1)
        ax.set_xscale("log")
        ax.set_xlabel("wait (hours, log; 0 drawn at 1 s)")
        ax.set_title(f"{side}: wait-time CDF", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction waited at most")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
