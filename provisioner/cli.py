"""The admin CLI: `provisioner COMMAND ...`. Thin: parse, call a module, print.

Exit codes: 0 ok, 1 an operation failed, 2 usage or config error. Errors go to stderr as one
line that says what to do next (a config with several errors: one line each).

Listings (`nodes`, `history`, `render`, `check`, `image list`) only read: they open the store
read-only and never create it or the token secret; `provisioner init` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from provisioner import POOLS, ROLES, __version__
from provisioner import config as configmod
from provisioner.errors import ConfigError, ConfigErrors, OperationError, ProvisionerError, UsageError
from provisioner.model import normalize_mac
from provisioner.nodeset import EXAMPLE, fold, select
from provisioner.store import INIT_HINT, Store, default_actor, iso, open_store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------- helpers


class Context:
    """What every command gets: the parsed args, and the site/store loaded on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._site = None
        self._store = None
        self._reader = None

    @property
    def site(self) -> configmod.Site:
        if self._site is None:
            self._site = configmod.load(configmod.find_config_path(self.args.config))
        return self._site

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.site)
            self._store.seed((n.name, n.default_role) for n in self.site.nodes.values())
        return self._store

    @property
    def reader(self) -> Store:
        """The store for a listing: read-only, never created (the writing one when already open)."""
        if self._store is not None:
            return self._store
        if self._reader is None:
            self._reader = open_store(self.site, read_only=True)
        return self._reader

    def close(self) -> None:
        for store in (self._store, self._reader):
            if store is not None:
                store.close()

    def nodes(self, expr: str | None) -> list[str]:
        pools: dict[str, list[str]] = {}
        for node in self.site.nodes.values():
            pools.setdefault(node.pool, []).append(node.name)
        return select(expr, self.site.nodes, pools)

    def secret(self) -> bytes:
        """The token secret, read only: a listing never makes one."""
        from provisioner.tokens import load_or_create_secret

        if not self.site.secret_file.is_file():
            raise UsageError(f"no token secret at {self.site.secret_file} yet (site.secret_file): {INIT_HINT}")
        return load_or_create_secret(self.site.secret_file)


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def emit_table(headers: list[str], rows: list[list]) -> None:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def report_changed(names: list[str], changed: list[str], done: str, untouched: str) -> int:
    """One line for the nodes a command changed, one for those it left as they were."""
    if changed:
        print(f"{fold(changed)}: {done}")
    others = [n for n in names if n not in changed]
    if others:
        print(f"{fold(others)}: {untouched}")
    return EXIT_OK


# --------------------------------------------------------------------------- commands


def cmd_init(ctx: Context) -> int:
    from provisioner.tokens import load_or_create_secret

    site = ctx.site
    had_secret = site.secret_file.is_file()
    store = ctx.store  # created (or migrated) and seeded with the config's nodes
    load_or_create_secret(site.secret_file)
    print(f"store {store.where}: schema version {store.schema_version()}, {len(site.nodes)} nodes")
    print(f"token secret {site.secret_file}: {'kept' if had_secret else 'created'} (back it up with the store)")
    return EXIT_OK


def cmd_check(ctx: Context) -> int:
    from provisioner.images import Resolver

    site = ctx.site
    shared = sum(1 for n in site.nodes.values() if n.shared)
    resolver = Resolver(site.image_root)

    def version(image) -> str:
        if image.name is None:
            return f"{image.version}"
        current = resolver.current(image.name)
        return f"{image.name} {current}" if current else f"{image.name} (NOT BUILT: run `provisioner image build {image.name}`)"

    print(f"{site.path}: ok: {len(site.nodes)} nodes ({shared} shared), "
          f"images: {', '.join(f'{r} -> {version(i)}' for r, i in site.images.items())}")
    insecure = [n.name for n in site.nodes.values() if n.bmc and n.bmc.insecure]
    if insecure:
        print(f"provisioner: warning: the Redfish BMCs of {fold(insecure)} are reached without checking their TLS "
              f"certificate (bmc.insecure: true); give bmc.ca_file instead", file=sys.stderr)
    from provisioner.policy import lending_lines

    homes = Counter(n.home_side for n in site.nodes.values() if n.shared)
    for line in lending_lines(site.policy, homes, site.run.interval_s):
        print(f"  lending: {line}")
    return EXIT_OK


def cmd_serve(ctx: Context) -> int:
    from provisioner.boot.server import serve

    if ctx.args.listen:
        configmod.parse_listen(ctx.args.listen, lambda m: UsageError(f"--listen {m}"))
    serve(ctx.site, ctx.args.listen, workers=ctx.args.workers, access_log=ctx.args.access_log,
          behind_proxy=ctx.args.behind_proxy)
    return EXIT_OK


def cmd_prerender(ctx: Context) -> int:
    import logging

    from provisioner.boot.prerender import Watcher

    watcher = Watcher(ctx.site, Path(ctx.args.folder), ctx.store)
    if not ctx.args.watch:
        stats = watcher.sync(force=True)
        print(f"{stats['scripts']} scripts in {ctx.args.folder} ({stats['written']} written, {stats['removed']} removed)")
        return EXIT_OK
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S+00:00")
    logging.Formatter.converter = time.gmtime  # UTC, as every time provisioner prints
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        watcher.watch(ctx.args.interval, stop)
    except KeyboardInterrupt:
        pass
    finally:  # stopped: no file may go stale; nginx passes every request to the app
        watcher.clear()
    return EXIT_OK


def cmd_nginx_config(ctx: Context) -> int:
    from provisioner.boot.prerender import nginx_config

    try:
        text = nginx_config(ctx.site, Path(ctx.args.scripts), ctx.args.upstream, ctx.args.listen, ctx.args.access_log)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(text, end="")
    return EXIT_OK


def node_rows(ctx: Context, names: list[str]) -> list[dict]:
    from provisioner.policy import reclaim_held
    from provisioner.states import DRAINING, WAIT
    from provisioner.switch.handlers import waiting_for

    states = ctx.reader.nodes(names)
    holds = ctx.reader.holds(names)
    rows = []
    now = time.time()
    for name in names:
        node, st, hold = ctx.site.nodes[name], states.get(name), holds.get(name)
        rows.append({
            "name": name,
            "pool": node.pool,
            "desired_role": st.desired_role if st else node.default_role,
            "booted_role": st.booted_role if st else None,
            "booted_version": st.booted_version if st else None,
            "booted_at": iso(st.booted_at) if st else None,
            "phase": st.phase if st else "steady",
            "phase_since": iso(st.phase_since) if st else None,
            "phase_since_ts": st.phase_since if st else None,
            "attempts": st.attempts if st else 0,
            "target_role": st.target_role if st else None,
            "pinned": bool(st and st.pinned),
            "pin_reason": st.pin_reason if st else None,
            "failed_reason": st.failed_reason if st else None,
            # A reclaim a PodDisruptionBudget refused: the node stays where it is for cooldown_s.
            "reclaim_held": reclaim_held(st.evict_refused_at, st.evict_refused, ctx.site.policy.cooldown_s, now)
            if st else None,
            # A reclaim that waits for its jobs to end rather than requeue them: what it waits for.
            "reclaim_waits": waiting_for(st) if st and st.phase == DRAINING and st.reclaim_work == WAIT else None,
            "held": hold is not None,  # an admin's maintenance hold (`provisioner hold`)
            "hold": hold.as_dict() if hold else None,  # reason, actor (who), since (when)
            "macs": list(node.macs),
            "ip": node.ip,
        })
    return rows


def age(since: float | None, now: float) -> str | None:
    """Seconds ago, as an admin reads it: 42s, 7m, 3h, 2d."""
    if since is None:
        return None
    s = max(0, int(now - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def cmd_nodes(ctx: Context) -> int:
    rows = node_rows(ctx, ctx.nodes(ctx.args.nodeset))
    rows = [r for r in rows if (not ctx.args.pool or r["pool"] == ctx.args.pool)
            and (not ctx.args.phase or r["phase"] == ctx.args.phase)]
    if ctx.args.json:
        emit_json(rows)
        return EXIT_OK
    now = time.time()
    emit_table(
        ["node", "pool", "desired", "booted", "target", "phase", "age", "pinned", "reason"],
        [[r["name"], r["pool"], r["desired_role"], r["booted_role"], r["target_role"], r["phase"],
          age(r["phase_since_ts"], now), "HELD" if r["held"] else "yes" if r["pinned"] else "no",
          r["failed_reason"] or (f"held: {r['hold']['reason']} ({r['hold']['actor']})" if r["held"] else None)
          or r["reclaim_held"] or r["reclaim_waits"] or r["pin_reason"]] for r in rows],
    )
    return EXIT_OK


def _reconciler(ctx: Context):
    from provisioner.reconcile import Reconciler

    return Reconciler(ctx.site, ctx.store)


def cmd_role(ctx: Context) -> int:
    if ctx.args.cancel:
        return _cancel_role(ctx)
    if ctx.args.role is None:
        raise UsageError("role: name the role (slurm or k8s), or give --cancel to end a switch")
    change = _reconciler(ctx).change_role(ctx.nodes(ctx.args.nodeset), ctx.args.role, actor=default_actor(),
                                          reason=ctx.args.reason, now=ctx.args.now)
    if change.requested:
        print(f"{fold(change.requested)}: switch to {change.role} requested, pinned ({change.reason})")
    if change.pinned:
        print(f"{fold(change.pinned)}: already {change.role}; pinned there")
    if change.requested and not change.now:
        print("the next `provisioner balance` pass carries it out (or run role again with --now); "
              f"follow it with `provisioner nodes {fold(change.requested)}`")
    if change.locked:
        print(f"{change.locked}; it will carry the switch on")
    if change.report is not None:
        _print_report(change.report)
    return EXIT_OK if change.ok else EXIT_FAILED


def _cancel_role(ctx: Context) -> int:
    """Exit 0 when no named node is left switching because of a refusal, else 1."""
    res = _reconciler(ctx).cancel(ctx.nodes(ctx.args.nodeset), actor=default_actor(), reason=ctx.args.reason)
    if res.cancelled:
        print(f"{fold(res.cancelled)}: switch cancelled, back in the role it had, unpinned ({res.reason})")
    if res.idle:
        print(f"{fold(res.idle)}: not switching: nothing to cancel")
    for name, why in res.refused.items():
        print(f"{name}: {why}")
    for note in res.notes:
        print(note)
    return EXIT_OK if res.ok else EXIT_FAILED


def _print_report(report, stamp: str = "") -> None:
    from provisioner.report import report_lines

    for error, line in report_lines(report, stamp):
        print(line, file=sys.stderr if error else sys.stdout)


def cmd_balance(ctx: Context) -> int:
    from provisioner.reconcile import PassLocked, pass_lock

    # cron appends every pass to one log: each text line starts with the time of the pass.
    stamp = "" if ctx.args.json else iso(time.time()) + " "
    try:
        with pass_lock(ctx.site, wait_s=ctx.args.wait):
            report = _reconciler(ctx).run_pass(dry_run=ctx.args.dry_run)
    except PassLocked as exc:
        # cron starts a pass every minute; one still running is normal, not an error.
        print(f"{stamp}provisioner: {exc}; exiting", file=sys.stderr)
        return EXIT_OK
    if ctx.args.json:
        emit_json(report.as_dict())
    else:
        if ctx.args.dry_run:
            print(f"{stamp}dry run: nothing changed")
        _print_report(report, stamp)
        if not (report.steps or report.moves or report.notes or report.errors):
            print(f"{stamp}nothing to do")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_run(ctx: Context) -> int:
    from provisioner import runner

    return runner.run(ctx.site, ctx.store)


def cmd_slurm_program(ctx: Context) -> int:
    from provisioner import slurm_programs

    rec = slurm_programs.record(ctx.site, ctx.store, ctx.args.slurm_command, ctx.args.nodeset)
    if rec.nodes:
        print(f"{fold(rec.nodes)}: {rec.kind} asked by slurmctld; {rec.woke}")
    if rec.ignored:
        print(f"{fold(rec.ignored)}: not shared nodes; provisioner leaves them to SLURM", file=sys.stderr)
    return EXIT_OK


def cmd_slurm_programs(ctx: Context) -> int:
    from provisioner import slurm_programs

    written = slurm_programs.write_programs(ctx.site, ctx.args.dir)
    print(f"# wrote {', '.join(str(p) for p in written.values())}; add to slurm.conf, then `scontrol reconfigure`:")
    for line in slurm_programs.slurm_conf_lines(ctx.site, written):
        print(line)
    return EXIT_OK


def cmd_release(ctx: Context) -> int:
    names = ctx.nodes(ctx.args.nodeset)
    changed = ctx.store.release(names, actor=default_actor(), reason=ctx.args.reason)
    return report_changed(names, changed, "unpinned; the balancer may move them again", "were not pinned")


def cmd_hold(ctx: Context) -> int:
    names = ctx.nodes(ctx.args.nodeset)
    changed = _reconciler(ctx).hold(names, actor=default_actor(), reason=ctx.args.reason)
    return _report_holds(ctx, names, changed, "held for maintenance: the balancer, slurmctld's asks and power saving "
                                              "leave them alone", "already held with that reason")


def cmd_unhold(ctx: Context) -> int:
    names = ctx.nodes(ctx.args.nodeset)
    changed = ctx.store.unhold(names, actor=default_actor(), reason=ctx.args.reason)
    return _report_holds(ctx, names, changed, "hold ended; the balancer may move them again", "were not held")


def _report_holds(ctx: Context, names: list[str], changed: list[str], done: str, untouched: str) -> int:
    if ctx.args.json:
        holds = ctx.store.holds(names)
        emit_json([{"name": n, "changed": n in changed, "held": n in holds,
                    "hold": holds[n].as_dict() if n in holds else None} for n in names])
        return EXIT_OK
    return report_changed(names, changed, done, untouched)


def cmd_render(ctx: Context) -> int:
    from provisioner.boot.boots import Boots
    from provisioner.boot.plan import BootPlanner
    from provisioner.boot.render import Renderer

    names = ctx.nodes(ctx.args.nodeset)
    if ctx.args.mac and len(names) > 1:
        raise UsageError(f"--mac is for one node; {fold(names)} is {len(names)} (e.g. `provisioner render sn01 --mac "
                         f"52:54:00:00:01:01`)")
    # The boot endpoint's own plan and renderer: the node's desired role and version pin apply.
    # It only reads: a node's current boot token where it has one, else a placeholder.
    secret = ctx.secret()
    planner = BootPlanner(ctx.site, secret, ctx.reader,
                          tokens=Boots(secret, ctx.reader, ctx.site.boot_window_s).peek)
    renderer = Renderer(ctx.site)
    failed = []
    for name in names:
        script = renderer.node(planner.plan(name, ctx.args.role), ctx.args.mac)
        if len(names) > 1:  # one script alone stays exactly what the node gets (#!ipxe first)
            print(f"# ---- {name}")
        sys.stdout.write(script.text)
        if not script.ok:
            failed.append(name)
            print(f"provisioner: {name} would get the unknown-node script: {script.reason}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_history(ctx: Context) -> int:
    names = None if ctx.args.nodeset is None else ctx.nodes(ctx.args.nodeset)
    events = ctx.reader.events(names, limit=ctx.args.limit, include_site=names is None)
    if ctx.args.json:
        emit_json([e.as_dict() for e in events])
        return EXIT_OK
    emit_table(["time", "node", "actor", "kind", "message"],
               [[iso(e.ts), e.node, e.actor, e.kind, e.message] for e in events])
    return EXIT_OK


BOOTING_ACTIONS = ("on", "reset", "cycle", "boot")


def cmd_power(ctx: Context) -> int:
    from provisioner.powering import power_nodes

    from provisioner import workload

    names = ctx.nodes(ctx.args.nodeset)
    action = ctx.args.action
    if action in workload.DISRUPTIVE and not ctx.args.force:
        nodes = [ctx.site.nodes[n] for n in names]
        refused = workload.refusals(nodes, workload.observe_work(ctx.site, nodes))
        if refused:
            raise OperationError(
                f"not going to power {action} {fold(refused)}: {workload.describe(refused)}; let the work end, "
                f"or move the nodes with `provisioner role` (it drains and evicts first), or add --force, which "
                f"kills that work")
    # status changes nothing and is not recorded, so it needs no store
    store = None if action == "status" else ctx.store
    if action in BOOTING_ACTIONS:  # an admin-requested boot: the nodes may fetch their secrets once
        store.grant_boot(names, actor=default_actor(), reason=f"provisioner power {action}")
    results = power_nodes(ctx.site, [ctx.site.nodes[n] for n in names], action, netboot=ctx.args.netboot,
                          store=store, actor=default_actor())
    if ctx.args.json:
        emit_json([r.as_dict() for r in results])
    else:
        emit_table(["node", "action", "result", "power", "method", "detail"],
                   [[r.node, r.action + (" --netboot" if r.netboot else ""), "ok" if r.ok else "FAILED",
                     r.state, r.method, r.error or r.note] for r in results])
    failed = [r.node for r in results if not r.ok]
    if failed:
        print(f"provisioner: power {action} failed on {fold(failed)} ({len(failed)} of {len(results)})",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_image_build(ctx: Context) -> int:
    import logging

    from provisioner import images

    logging.basicConfig(level=logging.INFO, format="provisioner: %(message)s", stream=sys.stderr)
    site = ctx.site
    r = images.build(site.image_definitions, site.image_root, ctx.args.name, cache=ctx.args.cache,
                     publish=not ctx.args.no_publish, store=ctx.store, actor=default_actor(),
                     rebuild=ctx.args.rebuild)
    if ctx.args.json:
        emit_json({"image": r.image, "version": r.version, "path": str(r.path), "published": r.published,
                   "previous": r.previous, "seconds": r.seconds, "manifest": r.manifest})
        return EXIT_OK
    size = sum(f["size"] for f in r.manifest["files"].values())
    cached = r.manifest.get("build", {}).get("cache") == "hit"
    print(f"{r.image} {r.version}: {'made from the build cache' if cached else 'built'} in {r.seconds:.1f} s "
          f"({_size(size)}) in {r.path}")
    if r.published:
        print(f"{r.image} {r.version}: published" + (f" (was {r.previous})" if r.previous else ""))
    else:
        print(f"not published; `provisioner image publish {r.image} {r.version}` makes it current")
    return EXIT_OK


def cmd_image_list(ctx: Context) -> int:
    from provisioner import images

    site = ctx.site
    found = images.listing(site.image_root, site.image_definitions, ctx.reader.image_pins(),
                           {role: image.name for role, image in site.images.items()}, ctx.args.name)
    if ctx.args.json:
        emit_json(list(found.rows))
        return EXIT_OK
    emit_table(["image", "version", "current", "size", "built", "kernel", "pinned"],
               [[r["image"], r["version"], "*" if r["current"] else "", _size(r["size"]), r["built_at"],
                 r["kernel_release"], fold(r["pinned_nodes"]) if r["pinned_nodes"] else ""] for r in found.rows])
    if found.unbuilt:
        print(f"not built yet: {', '.join(found.unbuilt)} (`provisioner image build NAME`)")
    return EXIT_OK


def cmd_image_publish(ctx: Context) -> int:
    from provisioner import images

    old = images.publish(ctx.site.image_root, ctx.args.name, ctx.args.version, store=ctx.store,
                         actor=default_actor(), reason=ctx.args.reason)
    print(f"{ctx.args.name} {ctx.args.version}: current" + (f" (was {old})" if old and old != ctx.args.version else ""))
    return EXIT_OK


def cmd_image_remove(ctx: Context) -> int:
    from provisioner import images

    images.remove(ctx.site.image_root, ctx.args.name, ctx.args.version, store=ctx.store, actor=default_actor(),
                  reason=ctx.args.reason)
    print(f"{ctx.args.name} {ctx.args.version}: removed")
    return EXIT_OK


def cmd_image_pin(ctx: Context) -> int:
    from provisioner import images

    names = ctx.nodes(ctx.args.nodeset)
    v = images.find_version(ctx.site.image_root, ctx.args.version, ctx.args.image)
    changed = ctx.store.pin_image(names, v.image, v.version, actor=default_actor(), reason=ctx.args.reason)
    return report_changed(names, changed, f"pinned to {v.image} {v.version}; they boot it from their next boot on",
                          f"already pinned to {v.image} {v.version}")


def cmd_image_unpin(ctx: Context) -> int:
    names = ctx.nodes(ctx.args.nodeset)
    changed = ctx.store.unpin_image(names, ctx.args.image, actor=default_actor(), reason=ctx.args.reason)
    return report_changed(names, changed, "unpinned; they boot the current version", "were not pinned")


def cmd_store_copy(ctx: Context) -> int:
    from provisioner.store.postgres import copy_store, redact

    source = ctx.store
    target = Store(ctx.args.to, password_file=ctx.args.password_file)
    if source.where == target.where:
        raise UsageError("store copy: the target is the site's own store")
    copied = copy_store(source, target)
    print(f"copied {source.where} to {redact(target.where)}: "
          + ", ".join(f"{n} {table.replace('_', ' ')} row(s)" for table, n in copied.items()))
    print(f"now set site.store: {redact(target.where)} (and site.store_password_file) on every host")
    return EXIT_OK


def cmd_simulate(ctx: Context) -> int:
    from provisioner.simulate.command import run

    return run(ctx.args)


def cmd_completion(ctx: Context) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=ctx.args.shell), end="")
    return EXIT_OK


def cmd_ssh_known_hosts(ctx: Context) -> int:
    from provisioner import hostkeys

    rows = hostkeys.known_hosts(ctx.site, ctx.nodes(ctx.args.nodeset))
    if ctx.args.json:
        emit_json(rows)
        return EXIT_OK
    for r in rows:
        print(r["line"])
    return EXIT_OK


# --------------------------------------------------------------------------- parser


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, each with an example of the right form."""

    def __init__(self, *args, example: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.example = example

    def error(self, message: str):
        hint = f" (e.g. `{self.example}`)" if self.example else f"; see `{self.prog} --help`"
        self.exit(EXIT_USAGE, f"{self.prog}: {message}{hint}\n")


def arg_type(name: str, check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a check that raises ValueError with the reason."""
    def convert(value: str):
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = name  # argparse names the type in its message
    return convert


def _mac(value: str) -> str:
    mac = normalize_mac(value)
    if mac is None:
        raise ValueError(f"not a MAC address: {value!r} (write it like 52:54:00:00:01:01)")
    return mac


def _hostport(value: str) -> str:
    configmod.parse_listen(value)  # ValueError: must be HOST:PORT
    return value


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number, got {value!r}") from None
    if n < 0:
        raise ValueError(f"must be 0 or more, got {n}")
    return n


def _seconds(value: str, positive: bool = False) -> float:
    try:
        s = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not (0 <= s < float("inf")) or (positive and s == 0):
        raise ValueError(f"must be {'more than 0' if positive else '0 or more'} seconds, got {value}")
    return s


def _positive(value: str) -> int:
    n = _count(value)
    if n < 1:
        raise ValueError(f"must be 1 or more, got {n}")
    return n


def _nginx_listen(value: str) -> str:
    if not value.strip() or any(c in value for c in ";{}\n"):
        raise ValueError(f"must be an nginx listen address (80, 0.0.0.0:80, [::]:80), got {value!r}")
    return value


MAC = arg_type("MAC", _mac)
HOSTPORT = arg_type("HOST:PORT", _hostport)
COUNT = arg_type("N", _count)
WORKERS = arg_type("N", _positive)
SECONDS = arg_type("SECONDS", _seconds)
INTERVAL = arg_type("SECONDS", lambda v: _seconds(v, positive=True))
NGINX_LISTEN = arg_type("ADDR", _nginx_listen)

NODESET_HELP = f"node set: a hostlist expression or @POOL, e.g. {EXAMPLE}"
JSON_HELP = "print JSON instead of the table (one object per row)"
REASON_HELP = "why (recorded in the history; default: {})"


def add_nodeset(sp: argparse.ArgumentParser, optional: bool = False, help_: str | None = None) -> None:
    """The one node-set positional every command takes (NODESET)."""
    sp.add_argument("nodeset", metavar="NODESET", nargs="?" if optional else None,
                    help=help_ or NODESET_HELP + (" (default: every node)" if optional else ""))


def add_reason(sp: argparse.ArgumentParser, default: str) -> None:
    sp.add_argument("--reason", default=default, metavar="TEXT", help=REASON_HELP.format(repr(default)))


def add_json(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help=JSON_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="provisioner",
        description="Diskless image switching for nodes shared between SLURM and Kubernetes.",
        example="provisioner --config /etc/provisioner/site.yaml nodes",
    )
    p.add_argument("--version", action="version", version=f"provisioner {__version__}",
                   help="print the version and exit")
    p.add_argument("--config", "-c", metavar="PATH",
                   help=f"site config (default: ${configmod.ENV_VAR} or {configmod.DEFAULT_PATH})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[Context], int], help_: str, example: str, parent=sub
            ) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_, description=help_, example=example)
        sp.set_defaults(handler=handler)
        return sp

    add("init", cmd_init, "create the store and the token secret (or migrate the store after an upgrade); "
                          "safe to run again", "provisioner init")
    add("check", cmd_check, "validate the site config, every error at once (exit 0 ok, 2 error); changes nothing",
        "provisioner --config /etc/provisioner/site.yaml check")

    sp = add("serve", cmd_serve, "run the boot endpoint (gunicorn)", "provisioner serve --listen 0.0.0.0:8080")
    sp.add_argument("--listen", metavar="HOST:PORT", type=HOSTPORT, help="default: site.listen")
    sp.add_argument("--workers", type=WORKERS, metavar="N",
                    help="worker processes (default: number of cores, at least 2)")
    sp.add_argument("--access-log", action="store_true", help="log every request to stderr")
    sp.add_argument("--behind-proxy", action="store_true",
                    help="nginx in front (provisioner nginx-config): take the client's address from X-Forwarded-For")

    sp = add("prerender", cmd_prerender, "write every node's iPXE script into FOLDER, one file per MAC, for nginx "
                                         "(--watch: keep them current)", "provisioner prerender /srv/ipxe --watch")
    sp.add_argument("folder", metavar="FOLDER", help="where the scripts go (nginx-config --scripts)")
    sp.add_argument("--watch", action="store_true", help="poll for changes and re-render until SIGTERM")
    sp.add_argument("--interval", type=INTERVAL, default=0.2, metavar="SECONDS", help="poll interval (default 0.2)")

    sp = add("nginx-config", cmd_nginx_config, "print the nginx site for the boot-storm deployment "
                                               "(scripts from files, /images/ by nginx, the rest proxied)",
             "provisioner nginx-config --scripts /srv/ipxe --upstream 127.0.0.1:8080")
    sp.add_argument("--scripts", required=True, metavar="FOLDER", help="the folder `provisioner prerender` writes")
    sp.add_argument("--upstream", required=True, type=HOSTPORT, metavar="HOST:PORT",
                    help="where `provisioner serve` listens")
    sp.add_argument("--listen", default="80", type=NGINX_LISTEN, metavar="ADDR",
                    help="nginx listen directive (default 80)")
    sp.add_argument("--access-log", default="/var/log/nginx/provisioner-boot.log", metavar="PATH|off",
                    help="nginx access log, paths without query strings (default /var/log/nginx/provisioner-boot.log)")

    from provisioner.states import PHASES

    sp = add("nodes", cmd_nodes, "list nodes: pool, desired, booted and target role, phase and its age, pinned, "
                                 "reason; reads only", "provisioner nodes @shared --phase failed")
    add_nodeset(sp, optional=True)
    sp.add_argument("--pool", choices=POOLS, help="only the nodes of this pool")
    sp.add_argument("--phase", choices=PHASES, help="only the nodes in this phase")
    add_json(sp)

    sp = add("role", cmd_role, "force shared nodes to a role and pin them there",
             "provisioner role 'sn[01-04]' k8s --reason 'GPU course this week'")
    add_nodeset(sp)
    sp.add_argument("role", choices=ROLES, nargs="?", help="the role to switch to (none with --cancel)")
    add_reason(sp, "role set by admin")
    sp.add_argument("--now", action="store_true",
                    help="carry the switch out now, as far as it can go without waiting (else: next balance pass)")
    sp.add_argument("--cancel", action="store_true",
                    help="end the nodes' switches that have not powered the node yet (lifting only provisioner's "
                         "own drains and cordons); exit 1 if one is past its power action")

    sp = add("balance", cmd_balance, "one balancing pass: move shared nodes where work is pending (run by cron)",
             "provisioner balance --dry-run")
    sp.add_argument("--dry-run", action="store_true", help="print the moves and reasons; change nothing")
    sp.add_argument("--wait", type=SECONDS, default=0.0, metavar="SECONDS",
                    help="wait this long for a running pass to finish (default: exit at once)")
    add_json(sp)

    add("run", cmd_run, "balance continuously: a pass at once on asks and unschedulable pods, else every "
                        "run.interval_s (instead of cron's balance; logs to stderr; SIGTERM stops it)",
        "provisioner run")

    sp = add("release", cmd_release, "unpin nodes: the balancer may move them again",
             "provisioner release 'sn[01-04]'")
    add_nodeset(sp)
    add_reason(sp, "released by admin")

    sp = add("hold", cmd_hold, "hold shared nodes for maintenance: the balancer, slurmctld's asks and power saving "
                               "leave them alone (nothing is drained or cordoned; `role` refuses them) until unhold",
             "provisioner hold 'sn[01-02]' --reason 'DIMM swap, ticket 4711'")
    add_nodeset(sp)
    sp.add_argument("--reason", required=True, metavar="TEXT",
                    help="why (shown by nodes, history, SLURM and Kubernetes)")
    add_json(sp)

    sp = add("unhold", cmd_unhold, "end nodes' maintenance holds: the balancer may move them again",
             "provisioner unhold 'sn[01-02]'")
    add_nodeset(sp)
    add_reason(sp, "maintenance done")
    add_json(sp)

    sp = add("render", cmd_render, "print the exact iPXE script each node gets; reads only",
             "provisioner render 'sn[01-02]' --role k8s")
    add_nodeset(sp)
    sp.add_argument("--role", choices=ROLES, help="render for this role instead of the desired one")
    sp.add_argument("--mac", type=MAC, help="as if asked with this MAC (default: the node's first MAC; one node only)")

    from provisioner.power.bmc import ACTIONS as POWER_ACTIONS  # light: no paramiko at start-up

    sp = add("power", cmd_power, "power control through each node's BMC or SSH (one result per node); "
                                 "off, soft, reset, cycle and boot refuse nodes that run jobs or pods",
             "provisioner power 'sn[01-02]' status")
    add_nodeset(sp)
    sp.add_argument("action", choices=POWER_ACTIONS,
                    help="status, on, off, soft (ACPI shutdown), reset, cycle, boot (on when off, reset when on)")
    sp.add_argument("--netboot", action="store_true", help="one-time network boot first (next boot only)")
    sp.add_argument("--force", action="store_true",
                    help="act on nodes that run jobs or pods (they are killed: no drain, no eviction, no PDB), "
                         "or whose cluster cannot be read")
    add_json(sp)

    img = sub.add_parser("image", help="diskless images: build, list, publish, remove, pin (rollback)",
                         description="diskless images: build, list, publish, remove, pin (rollback)",
                         example="provisioner image list")
    isub = img.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)

    isp = add("build", cmd_image_build, "build an image into a new version, then publish it",
              "provisioner image build slurm", isub)
    isp.add_argument("name", help="an image defined in site.image_definitions (NAME/image.yaml there)")
    isp.add_argument("--no-publish", action="store_true", help="build only; publish later with `image publish`")
    isp.add_argument("--cache", type=Path, metavar="DIR",
                     help="download cache (default: $PROVISIONER_CACHE/images or ~/.cache/provisioner/images)")
    isp.add_argument("--rebuild", action="store_true",
                     help="build from scratch even when the build cache ($PROVISIONER_CACHE/image-builds or "
                          "~/.cache/provisioner/image-builds) has a build with the same inputs; it replaces it")
    add_json(isp)
    isp = add("list", cmd_image_list, "versions of each image: current, size, pinned nodes; reads only",
              "provisioner image list slurm", isub)
    isp.add_argument("name", nargs="?", help="only this image (default: all)")
    add_json(isp)
    isp = add("publish", cmd_image_publish, "make a version current (also: roll back to an old one)",
              "provisioner image publish slurm 2026.11.0 --reason 'roll back: NFS client bug'", isub)
    isp.add_argument("name", help="the image")
    isp.add_argument("version", help="one of `provisioner image list NAME`")
    add_reason(isp, "published by admin")
    isp = add("remove", cmd_image_remove, "delete a version (not the current one, nor a pinned one)",
              "provisioner image remove slurm 2026.10.0", isub)
    isp.add_argument("name", help="the image")
    isp.add_argument("version", help="one of `provisioner image list NAME`")
    add_reason(isp, "removed by admin")
    isp = add("pin", cmd_image_pin, "boot nodes from one version of an image (per-node rollback)",
              "provisioner image pin sn01 slurm/2026.10.0", isub)
    add_nodeset(isp)
    isp.add_argument("version", help="VERSION or NAME/VERSION")
    isp.add_argument("--image", help="the image, when several have this version")
    add_reason(isp, "pinned by admin")
    isp = add("unpin", cmd_image_unpin, "nodes boot the current version again", "provisioner image unpin sn01", isub)
    add_nodeset(isp)
    isp.add_argument("--image", help="only this image's pin (default: all)")
    add_reason(isp, "unpinned by admin")

    ssh = sub.add_parser("ssh", help="the nodes' SSH host keys (per node, delivered in their overlays)",
                         description="the nodes' SSH host keys (per node, delivered in their overlays)",
                         example="provisioner ssh known-hosts")
    ssub = ssh.add_subparsers(dest="ssh_command", metavar="SSH_COMMAND", required=True)
    ssp = add("known-hosts", cmd_ssh_known_hosts,
              "print known_hosts lines for the nodes (their keys are made now when they have none): "
              "write them to power.ssh.known_hosts", "provisioner ssh known-hosts @shared", ssub)
    add_nodeset(ssp, optional=True)
    add_json(ssp)

    sl = sub.add_parser("slurm", help="slurmctld's power-saving programs (ResumeProgram, SuspendProgram, ...)",
                        description="slurmctld's power-saving programs: shared nodes in Kubernetes are "
                                    "'powered down' for SLURM; these record SLURM's asks for the balancer",
                        example="provisioner slurm programs --dir /usr/local/sbin")
    slsub = sl.add_subparsers(dest="slurm_command", metavar="SLURM_COMMAND", required=True)
    for name, help_ in (("resume", "ResumeProgram: SLURM gave jobs to these nodes; switch them to SLURM"),
                        ("suspend", "SuspendProgram: idle in SLURM; back to the shared pool (to Kubernetes if it "
                                    "has work, else powered off)"),
                        ("resume-fail", "ResumeFailProgram: SLURM gave up waiting for these nodes")):
        ssp = slsub.add_parser(name, help=help_, description=help_ + ". Records the ask and returns at once.",
                               example=f"provisioner slurm {name} 'sn[01-02]'")
        ssp.set_defaults(handler=cmd_slurm_program)
        add_nodeset(ssp, help_="as slurmctld passes it, e.g. sn[01-02]")
    ssp = add("programs", cmd_slurm_programs,
              "write the three program wrappers into DIR and print the slurm.conf lines for them",
              "provisioner slurm programs --dir /usr/local/sbin", slsub)
    ssp.add_argument("--dir", type=Path, required=True, help="e.g. /usr/local/sbin (slurmctld must be able to run them)")

    st = sub.add_parser("store", help="the state store (SQLite, PostgreSQL)", description="the state store",
                        example="provisioner store copy --to postgresql://provisioner@db1:5432/provisioner")
    stsub = st.add_subparsers(dest="store_command", metavar="STORE_COMMAND", required=True)
    ssp = add("copy", cmd_store_copy,
              "copy the site's store (every node, event, ask, image pin, demand and hold row) into an empty "
              "PostgreSQL database (or SQLite file)",
              "provisioner store copy --to postgresql://provisioner@db1:5432/provisioner", stsub)
    ssp.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DB (no password in it)")
    ssp.add_argument("--password-file", type=Path, help="the target's password (default: PGPASSWORD)")

    from provisioner.simulate.command import add_arguments as add_simulate_arguments  # no matplotlib at start-up

    sp = add("simulate", cmd_simulate, "replay a SLURM job trace (SWF) and a pod load in simulated time: the static "
                                       "split, the paper's cron rule, provisioner's policy and a bound, side by side",
             "provisioner simulate --slurm-trace trace.swf --no-plots")
    add_simulate_arguments(sp)

    sp = add("history", cmd_history, "show the event log, oldest first; reads only",
             "provisioner history sn01 --limit 20")
    add_nodeset(sp, optional=True, help_=NODESET_HELP + " (default: everything, site events too)")
    sp.add_argument("--limit", type=COUNT, default=100, metavar="N", help="the last N events (default 100; 0: all)")
    add_json(sp)

    sp = add("completion", cmd_completion, "print a shell completion script (generated from this parser by shtab)",
             "provisioner completion bash > /etc/bash_completion.d/provisioner")
    sp.add_argument("shell", choices=("bash", "zsh", "tcsh"), help="the shell")

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    ctx = Context(args)
    try:
        return args.handler(ctx)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"provisioner: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"provisioner: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"provisioner: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OperationError as exc:
        print(f"provisioner: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ProvisionerError as exc:
        print(f"provisioner: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("provisioner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    finally:
        ctx.close()
