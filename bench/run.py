"""Runs the benchmarks: `python -m bench.run [NAME ...] [options]` (default: all of them).

Each benchmark is a module in bench/ listed in BENCHMARKS below, with
  TITLE: str                              one line, for the summary
  add_arguments(parser) -> None           optional: its own --options
  run(args) -> dict                       does the measurement; JSON-serialisable result
  summary(result) -> str                  Markdown for the terminal and BENCHMARKS.md
Raw results go to var/bench/NAME-YYYYmmddTHHMMSS.json (and NAME-latest.json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"

# name -> module. Add a benchmark by adding a module and one line here.
BENCHMARKS: dict[str, str] = {
    "boot_storm": "bench.boot_storm",
    "decide": "bench.decide",
    "image_storm": "bench.image_storm",
    "observe": "bench.observe",
    "reaction": "bench.reaction",
    "simulate": "bench.simulate",
    "soak": "bench.soak",
    "store_storm": "bench.store_storm",
    "vm_boot": "bench.vm_boot",
}


def machine() -> dict:
    """What the numbers depend on, recorded with every result."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    modules = {name: importlib.import_module(mod) for name, mod in BENCHMARKS.items()}
    for name, mod in modules.items():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(parser.add_argument_group(f"{name}: {mod.TITLE}"))
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    failed = 0
    # A module with BY_NAME_ONLY (the soak: minutes by design) runs only when named.
    for name in args.names or [n for n, m in modules.items() if not getattr(m, "BY_NAME_ONLY", False)]:
        mod = modules[name]
        print(f"== {name}: {mod.TITLE}", file=sys.stderr, flush=True)
        started = time.time()
        info = machine()
        try:
            result = mod.run(args)
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        record = {
            "benchmark": name,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": info,
            "result": result,
        }
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(started))
        text = json.dumps(record, indent=2, default=str) + "\n"
        (OUT / f"{name}-{stamp}.json").write_text(text)
        (OUT / f"{name}-latest.json").write_text(text)
        m = info
        print(f"\n### {name}: {mod.TITLE}\n\n{record['date']} on {m['nproc']} x {m['cpu_model']} "
              f"(load average before: {', '.join(f'{x:.2f}' for x in m['loadavg_before'])})\n")
        print(mod.summary(result))
        print(f"\nraw: {(OUT / f'{name}-{stamp}.json').relative_to(ROOT)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
