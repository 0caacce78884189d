"""provisioner as a ProvisioningRequest provider (docs/kueue.md), between the pass and the API.

Each request of provisioner's class becomes ONE gang ask for policy.decide() (all or nothing:
N nodes of a shape); its answer becomes the request's conditions as the API defines them:
- Accepted on first sight;
- Provisioned=False (reason Waiting or Switching, the policy's words) while it cannot come or
  its nodes switch; Provisioned=True once every booked node has joined Kubernetes and carries
  the request's label (NODE_LABEL), which Kueue's ProvisioningRequestConfig turns into the
  pods' node selector;
- Failed when it can never be served (larger than the shared pool, no shared node matches, a
  PodTemplate that does not exist, a quantity that does not parse);
- BookingExpired once the booking (kubernetes.booking_s) has run out: the label goes, the
  nodes are free again.
Every change is an event in `provisioner history` (node: none, kind provreq-*); every answer
is a note of the pass (`balance --dry-run` shows them, and changes nothing there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from provisioner import policy as pol
from provisioner.clusters.provisioning_requests import ProvisioningRequests, Seen, accepted, now_utc
from provisioner.errors import OperationError
from provisioner.provisioning_demand import (
    ACCEPTED, BOOKING_EXPIRED, FAILED, NODE_LABEL, PROVISIONED, Request, condition)

if TYPE_CHECKING:
    from provisioner.store import Store

log = logging.getLogger(__name__)

REASONS = {"failed": "CannotBeServed", "waiting": "Waiting", "switching": "Switching", "provisioned": "Provisioned",
           "expired": "BookingExpired"}


def gang_asks(seen: Iterable[Seen], booking_s: float) -> tuple[pol.GangAsk, ...]:
    """The requests still to serve, as gang asks (bad and finished ones are not asks)."""
    out = []
    for s in seen:
        r = s.request
        if r is None or r.finished:
            continue
        out.append(pol.GangAsk(
            id=r.key,
            pod_sets=tuple((pol.PendingPod(r.namespace, ps.template, ps.cpu_m, ps.memory, ps.gpus, ps.node_selector,
                                           ps.tolerations), ps.count) for ps in r.pod_sets),
            booked=r.booked,
            provisioned_at=r.provisioned_at.timestamp() if r.provisioned_at else None,
            booking_s=booking_s,
            source=f"ProvisioningRequest {r.key}",
        ))
    return tuple(out)


class Provider:
    """Carries out the policy's answers to gang asks on the requests, and records them."""

    def __init__(self, api: ProvisioningRequests, store: "Store", actor: str):
        self.api = api
        self.store = store
        self.actor = actor
        self.read_error: str | None = None

    def read(self) -> tuple[Seen, ...]:
        """The requests of our class; none when they cannot be read (the error is the pass's,
        reported by serve(): the rest of the pass, SLURM's asks and pod demand, goes on)."""
        try:
            self.read_error = None
            return tuple(self.api.requests())
        except OperationError as exc:
            self.read_error = f"ProvisioningRequests not served in this pass: {exc}"
            return ()

    def serve(self, seen: Iterable[Seen], answers: Iterable[pol.GangAnswer], notes: list[str],
              dry_run: bool) -> list[str]:
        """Apply the answers; returns errors (one request's failure never stops the others)."""
        seen = list(seen)
        by_key = {s.key: s for s in seen}
        errors: list[str] = [self.read_error] if self.read_error else []
        for s in seen:
            try:
                if s.bad is not None:
                    notes.append(f"ProvisioningRequest {s.key}: cannot be served: {s.bad}")
                    if not dry_run and (s.conditions.get(FAILED) or {}).get("status") != "True":
                        log.warning("ProvisioningRequest %s: Failed (%s): %s", s.key, s.bad.reason, s.bad)
                        self._set(s, [condition(FAILED, True, s.bad.reason, str(s.bad), now_utc())], "failed",
                                  str(s.bad))
                elif not dry_run and (s.conditions.get(ACCEPTED) or {}).get("status") != "True":
                    self._set(s, [accepted(now_utc())], "accepted", "accepted: provisioner serves its class")
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
                errors.append(f"ProvisioningRequest {s.key}: {exc}")
        for a in answers:
            s = by_key.get(a.ask)
            notes.append(f"ProvisioningRequest {a.ask}: {a.outcome}: {a.message}")
            if dry_run or s is None or s.request is None:
                continue
            try:
                self._answer(s, s.request, a)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"ProvisioningRequest {a.ask}: {exc}")
        if not dry_run and not self.read_error:
            try:
                self._unlabel_stale(seen)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"ProvisioningRequests: removing stale node labels: {exc}")
        return errors

    def _answer(self, s: Seen, r: Request, a: pol.GangAnswer) -> None:
        now = now_utc()
        reason = REASONS.get(a.outcome, a.outcome)
        if a.outcome == "failed":
            self._set(s, [condition(FAILED, True, reason, a.message, now),
                          condition(PROVISIONED, False, reason, a.message, now)], a.outcome, a.message)
        elif a.outcome == "expired":
            self.api.label_nodes(r.booked, None)
            self._set(s, [condition(BOOKING_EXPIRED, True, reason, a.message, now)], a.outcome, a.message)
        elif a.outcome == "provisioned":
            self.api.label_nodes(a.nodes, r.label)
            if r.status(PROVISIONED) != "True" or tuple(r.booked) != tuple(a.nodes):
                self._set(s, [condition(PROVISIONED, True, reason, a.message, now)], a.outcome, a.message,
                          nodes=a.nodes, label=r.label)
        else:  # waiting, switching: Provisioned=False with the policy's words, when they change
            old = s.conditions.get(PROVISIONED) or {}
            if (old.get("status"), old.get("reason"), old.get("message")) != ("False", reason, a.message) \
                    or tuple(r.booked) != tuple(a.nodes):
                self._set(s, [condition(PROVISIONED, False, reason, a.message, now)], a.outcome, a.message,
                          nodes=a.nodes, label=r.label)

    def _set(self, s: Seen, conditions: list[dict], outcome: str, message: str, nodes: Iterable[str] | None = None,
             label: str | None = None) -> None:
        if self.api.set_status(s, conditions, nodes, label):
            self.store.add_event(None, self.actor, f"provreq-{outcome}", f"ProvisioningRequest {s.key}: {message}",
                                 {"request": s.key, "nodes": list(nodes or ())})

    def _unlabel_stale(self, seen: list[Seen]) -> None:
        """Nodes labelled for a request that is gone or finished lose the label (nothing stranded)."""
        live = {s.request.label for s in seen if s.request is not None and not s.request.finished}
        stale = [n for n, v in self.api.labelled().items() if v not in live]
        if stale:
            self.api.label_nodes(stale, None)
            self.store.add_event(None, self.actor, "provreq-released",
                                 f"{', '.join(sorted(stale))}: {NODE_LABEL} removed (its ProvisioningRequest is gone "
                                 "or finished)", {"nodes": sorted(stale)})
