"""The two locks of the balancer, in one place: `pass_lock` (one balance pass at a time per site,
across hosts on PostgreSQL) and `run_lock` (one `provisioner run` loop per site and host).

A pass holds its lock for its whole length and checks, right before each write of a switch and
each power action, that it still holds it (`check_held`): with PostgreSQL the lock lives on a
connection of its own, and when that connection is lost (a database restart, a network cut)
PostgreSQL releases the lock and another host's pass may take it. The pass then stops before its
next write (LockLost) instead of racing that one; its own store connection may well have been
re-made meanwhile, which proves nothing about the lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path

from provisioner.errors import OperationError, UsageError
from provisioner.model import Site


class PassLocked(Exception):
    """Another pass holds the lock."""


class LockLost(OperationError):
    """The pass no longer holds its lock: it must stop before its next write. Every handler of
    errors in a pass lets it through (the CLI prints it and exits 1)."""


# The check of the lock the running pass holds (None: no lock held, as in the unit tests).
_HELD: ContextVar[Callable[[], None] | None] = ContextVar("provisioner_pass_lock", default=None)


def check_held() -> None:
    """Raise LockLost when the lock this pass runs under is gone. A no-op without a lock."""
    check = _HELD.get()
    if check is not None:
        check()


@contextmanager
def holding(check: Callable[[], None]):
    """Within the block, check_held() runs `check` (which raises LockLost when the lock is gone)."""
    token = _HELD.set(check)
    try:
        yield
    finally:
        _HELD.reset(token)


@contextmanager
def pass_lock(site: Site, wait_s: float = 0.0):
    """One pass at a time per site (cron may start a pass while the last one still runs).

    flock on a file next to the store: released by the kernel when the holder dies, so a
    killed pass never leaves a stale lock. cron's passes do not wait (wait_s=0); an admin's
    `role --now` waits a little for a running pass to finish.

    With a PostgreSQL store (site.store_url) the balancers of every host share the lock: a
    session-level advisory lock (pg_try_advisory_lock on a key derived from site.name) on a
    connection of its own, held for the pass; PostgreSQL releases it when that connection ends,
    also when the pass is SIGKILLed. The same wait_s."""
    if site.store_url:
        from provisioner.store.postgres import LockBusy, balance_lock

        with ExitStack() as held:
            try:
                lease = held.enter_context(balance_lock(site.store_url, site.store_password_file, site.name,
                                                        wait_s=wait_s))
            except LockBusy as exc:
                raise PassLocked(f"another balance pass is running ({exc})") from None

            def check() -> None:
                if not lease.alive():
                    raise LockLost(f"the balance lock's connection to {lease.where} was lost: another host may "
                                   "run a pass now; this one stops before its next write")

            with holding(check):
                yield
        return
    path = Path(str(site.store) + ".balance.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PassLocked(f"another balance pass is running (lock {path})") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield  # a flock lasts as long as this process: nothing to check
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the loop's lock


class AlreadyRunning(UsageError):
    """Another `provisioner run` holds this site's lock."""


def run_lock_path(site: Site) -> Path:
    return Path(str(site.store) + ".run.lock")


@contextmanager
def run_lock(site: Site):
    """Held while the loop runs: a flock (released by the kernel if the loop dies) on a file
    that names the holder's pid. Raises AlreadyRunning when another loop holds it."""
    path = run_lock_path(site)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(5):  # daemon_running() holds a shared lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise AlreadyRunning(f"`provisioner run` is already running for {site.path} (pid {holder}, "
                                         f"lock {path}): one per site; stop that one first") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def daemon_running(site: Site) -> bool:
    """A `provisioner run` loop holds this site's lock: it will pick up new asks by itself."""
    try:
        fd = os.open(run_lock_path(site), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the shared lock just taken
    return False
