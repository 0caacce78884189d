"""The text form of a balance pass's report (reconcile.PassReport), one copy for every command
that shows one: `provisioner balance` and `role --now` print it, `provisioner run` logs it."""

from __future__ import annotations


def report_lines(report, stamp: str = "") -> list[tuple[bool, str]]:
    """(is_error, line) for each line, in the order `provisioner balance` prints them: errors
    (its stderr), then steps, moves and notes (its stdout). Each line starts with `stamp`."""
    lines = [(True, f"{stamp}error: {e}") for e in report.errors]
    lines += [(False, f"{stamp}{s.node}: {s.action}: {s.message}" + ("" if s.ok else " [FAILED]"))
              for s in report.steps]
    lines += [(False, f"{stamp}move {m.node} -> {m.to_role}: {m.reason}") for m in report.moves]
    lines += [(False, f"{stamp}note: {n}") for n in report.notes]
    return lines
