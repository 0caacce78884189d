"""Boots: one token per boot, and the boot window in which a node may fetch its secrets.

The threat model (docs/security.md): users with a shell on a node can read its MAC, ask for its
iPXE script and read /proc/cmdline, so nothing they can learn that way may open the node's
secrets (the munge key, host keys, kubelet credentials). Three rules keep them out:

- **a boot window**: the overlay's secret part is served only while the node is being booted
  by us: its switch is in `booting` (or `rebooting` after the power action was written), or an
  admin asked for the boot (`provisioner power NODES on|reset|cycle|boot`, which records a
  grant good for site.boot_window_s; the balancer records the same grant before it powers on a
  node slurmctld resumed). A node rebooting on its own gets no secrets: an event
  says so and an admin boots it (the anchors: Ironic's per-deploy agent token, Confluent's
  per-node key set once at deployment);
- **once per window**, with the token of that boot, from the node's address and (by default)
  from a privileged source port (below 1024: only root on the node can send from one, so a
  user's process cannot ask even with the token; Warewulf's secure overlays);
- **one token per boot**: the token in the script (and so in /proc/cmdline) is made for that
  boot, and the boot callback spends it; afterwards it opens nothing.

`window()` and `needs_new_token()` are pure; `Boots` reads and writes the store's `boots` rows
(compare-and-set, so every worker of the boot server and prerender agree).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from provisioner.errors import ProvisionerError
from provisioner.states import BOOTING, REBOOTING
from provisioner.tokens import boot_token, new_nonce

PRIVILEGED_PORTS = 1024
# An admin's grant is stamped by the host `provisioner power` ran on, and judged by the boot
# server's clock: this much slack for the two clocks (a boot server that is ahead would close the
# window early; one behind keeps it open that much longer).
GRANT_CLOCK_SLACK_S = 60
# What `provisioner render` shows where the endpoint would make a new token (render only reads).
NEW_TOKEN = "NEW-TOKEN-AT-BOOT"
# The boots table's columns, in order (the store's migration 6).
BOOT_COLUMNS = ("node", "nonce", "issued_at", "spent_at", "secrets_at", "secrets_window", "granted_at", "granted_by")


def window(phase: str | None, phase_since: float | None, power_at: float | None, granted_at: float | None,
           now: float, grant_s: float) -> float | None:
    """When the node's current boot window opened, or None when it is not being booted now."""
    starts = []
    if phase == BOOTING and phase_since:
        starts.append(phase_since)
    elif phase == REBOOTING and power_at and power_at >= (phase_since or 0):
        starts.append(power_at)  # the power action is written right before it is sent
    if granted_at and now - granted_at < grant_s + GRANT_CLOCK_SLACK_S:
        starts.append(granted_at)
    return max(starts) if starts else None


def needs_new_token(row: dict | None, start: float | None) -> bool:
    """A new token when there is none, the callback spent it, or it was made before this window
    opened (a token a user read from the running node is no good for its next boot)."""
    if row is None or not row.get("nonce") or row.get("spent_at") is not None:
        return True
    return start is not None and (row.get("issued_at") or 0) < start


@dataclass(frozen=True)
class Secrets:
    """Whether a request may have the overlay's secret part now (why not, when it may not)."""

    ok: bool
    why: str = ""
    nonce: str | None = None
    window: float | None = None


class Boots:
    def __init__(self, secret: bytes, store, grant_s: float):
        self.secret, self.store, self.grant_s = secret, store, grant_s

    @classmethod
    def for_site(cls, site, store=None) -> "Boots":
        from provisioner.store import open_store
        from provisioner.tokens import load_or_create_secret

        return cls(load_or_create_secret(site.secret_file), store or open_store(site), site.boot_window_s)

    def window_of(self, name: str, row: dict | None, now: float) -> float | None:
        st = self.store.get(name)
        return window(st.phase if st else None, st.phase_since if st else None, st.power_at if st else None,
                      (row or {}).get("granted_at"), now, self.grant_s)

    def token(self, name: str, row: dict | None = None, start: float | None = None, *, read: bool = True) -> str:
        """The node's token for the boot under way: the current one, or a new one (a store write)
        when needs_new_token(). Raises ProvisionerError when the store is unavailable."""
        now = time.time()
        for _ in range(3):
            if read:
                row = self.store.boot_row(name)
                start = self.window_of(name, row, now)
            if not needs_new_token(row, start):
                return boot_token(self.secret, name, row["nonce"])
            nonce = new_nonce()
            if self.store.issue_boot(name, nonce, now, (row or {}).get("nonce")):
                return boot_token(self.secret, name, nonce)
            read = True  # another worker issued one meanwhile: use that one
        raise ProvisionerError(f"node {name}: its boot token keeps changing; retry")

    def peek(self, name: str) -> str:
        """The token the node's next script would carry, without writing: the current one when it
        is still good, else a placeholder (the boot endpoint makes a new one when asked)."""
        row = self.store.boot_row(name)
        if needs_new_token(row, self.window_of(name, row, time.time())):
            return NEW_TOKEN
        return boot_token(self.secret, name, row["nonce"])

    def current(self, name: str, presented: str | None) -> tuple[dict | None, bool]:
        """(the node's boots row, whether `presented` is its current unspent token)."""
        row = self.store.boot_row(name)
        if not presented or not isinstance(presented, str) or row is None or not row.get("nonce") \
                or row.get("spent_at") is not None:
            return row, False
        return row, hmac.compare_digest(boot_token(self.secret, name, row["nonce"]), presented)

    def may_have_secrets(self, name: str, presented: str | None) -> Secrets:
        row, ok = self.current(name, presented)
        if not ok:
            return Secrets(False, "not the token of this boot (spent by its callback, or of another boot)")
        start = self.window_of(name, row, time.time())
        if start is None:
            return Secrets(False, "the node is not being booted now (no switch in booting, no admin-requested "
                                  f"boot); boot it with `provisioner power {name} reset`")
        if (row.get("issued_at") or 0) < start:
            return Secrets(False, "the token is from before this boot; ask for the script again")
        if row.get("secrets_window") == start:
            return Secrets(False, "served once in this boot already")
        return Secrets(True, nonce=row["nonce"], window=start)

    def served(self, name: str, grant: Secrets) -> bool:
        return self.store.serve_boot_secrets(name, grant.nonce, grant.window, time.time())
