"""provisioner.power.ipmi (pyghmi) against the BMC simulator, with ipmitool as an independent client."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from provisioner.errors import OperationError
from provisioner.model import Bmc
from provisioner.power import bmc as bmc_mod
from provisioner.power.bmc import BmcAuthError, BmcBusy, BmcError, BmcStateError, BmcTimeout
from tests.fixtures.bmc import BMC_PASSWORD
from tests.support import require_binary

pytestmark = pytest.mark.integration

# Short enough to keep the suite fast, long enough for ~15 UDP round trips between three processes
# on a busy 2-core machine (other test suites run beside this one).
TIMEOUT, RETRIES = 3.0, 1


@pytest.fixture
def ipmitool(tmp_path):
    binary = require_binary("ipmitool")
    pwfile = tmp_path / "ipmi-pw"
    pwfile.write_text(BMC_PASSWORD + "\n")

    def run(port: int, *args: str, check: bool = True, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        res = subprocess.run([binary, "-I", "lanplus", *extra, "-H", "127.0.0.1", "-p", str(port), "-U", "admin",
                              "-f", str(pwfile), *args],
                             capture_output=True, text=True, timeout=30)
        if check:
            assert res.returncode == 0, res.stderr
        return res

    return run


def bmc(sim, name, password=BMC_PASSWORD, user="admin") -> Bmc:
    return Bmc("127.0.0.1", sim.port(name), user, password)


def tool_power(ipmitool, port) -> str:
    out = ipmitool(port, "power", "status").stdout
    return re.search(r"Chassis Power is (on|off)", out).group(1)


def tool_bootdev(ipmitool, port) -> tuple[str, bool | None]:
    """(device, persistent) from `chassis bootparam get 5`; ("default", None) when no override."""
    out = ipmitool(port, "chassis", "bootparam", "get", "5").stdout
    dev = re.search(r"Boot Device Selector : (.+)", out).group(1).strip()
    if dev == "No override" or "Boot Flag Invalid" in out:
        return "default", None
    return {"Force PXE": "network"}.get(dev, dev), "all future boots" in out


SEQUENCE = [  # (action, netboot, expected power after)
    ("on", False, "on"),
    ("reset", True, "on"),
    ("cycle", False, "on"),
    ("soft", False, "off"),
    ("on", True, "on"),
    ("off", False, "off"),
    ("boot", True, "on"),
    ("boot", False, "on"),
    ("status", False, "on"),
]


def test_pyghmi_and_ipmitool_agree_on_every_action(bmcs, ipmitool):
    port = bmcs.port("bn01")
    # The simulator refuses cipher suite 17 (0x11) as a real BMC does (pyghmi's server would
    # accept it and break the client); suite 3, which both clients use, works.
    assert ipmitool(port, "power", "status", check=False, extra=("-C", "17")).returncode != 0
    assert ipmitool(port, "power", "status", extra=("-C", "3")).returncode == 0
    assert tool_power(ipmitool, port) == bmc_mod.power(bmc(bmcs, "bn01"), "status", timeout=TIMEOUT).power == "off"
    for action, netboot, expected in SEQUENCE:
        res = bmc_mod.power(bmc(bmcs, "bn01"), action, netboot=netboot, timeout=TIMEOUT, retries=RETRIES)
        assert res.power == expected, action
        assert tool_power(ipmitool, port) == expected, action
        # Our client's view of the boot override == ipmitool's == the simulator's.
        sim = bmcs.state("bn01")
        tool_dev, _ = tool_bootdev(ipmitool, port)
        assert tool_dev == sim["bootdev"] == "default", action  # any one-time override was used up
        if netboot:
            assert res.bootdev == "network" and res.persistent is False
            assert sim["boots"][-1]["bootdev"] == "network" and sim["boots"][-1]["persistent"] is False
    assert bmcs.state("bn01")["actions"] == ["on", "reset", "cycle", "soft", "on", "off", "on", "reset"]


def test_ipmitool_actions_seen_by_pyghmi(bmcs, ipmitool):
    port, b = bmcs.port("bn02"), bmc(bmcs, "bn02")
    ipmitool(port, "power", "on")
    assert bmc_mod.power(b, "status", timeout=TIMEOUT).power == "on"
    ipmitool(port, "chassis", "bootdev", "pxe")
    assert bmcs.state("bn02")["bootdev"] == "network" and not bmcs.state("bn02")["persistent"]
    assert tool_bootdev(ipmitool, port) == ("network", False)
    ipmitool(port, "chassis", "bootdev", "pxe", "options=persistent")
    assert tool_bootdev(ipmitool, port) == ("network", True)
    ipmitool(port, "power", "reset")
    # A persistent override survives the boot; the one-time one set by us would not.
    assert bmcs.state("bn02")["boots"][-1] == {**bmcs.state("bn02")["boots"][-1], "bootdev": "network",
                                                "persistent": True}
    assert tool_bootdev(ipmitool, port) == ("network", True)
    ipmitool(port, "power", "off")
    assert bmc_mod.power(b, "status", timeout=TIMEOUT).power == "off"


def test_one_time_netboot_is_used_by_the_next_boot_only(bmcs, ipmitool):
    b, port = bmc(bmcs, "bn03"), bmcs.port("bn03")
    bmcs.set_power("bn03", "on")
    res = bmc_mod.power(b, "reset", netboot=True, timeout=TIMEOUT, retries=RETRIES)
    assert (res.power, res.bootdev, res.persistent) == ("on", "network", False)
    st = bmcs.state("bn03")
    assert st["bootdev_sets"] == [{"bootdev": "network", "persistent": False}]
    assert [(b_["how"], b_["bootdev"], b_["persistent"]) for b_ in st["boots"]] == [("reset", "network", False)]
    # The node reboots by itself later: back to its normal boot order.
    ipmitool(port, "power", "reset")
    assert bmcs.state("bn03")["boots"][-1]["bootdev"] == "default"


def test_a_reset_answered_late_is_retransmitted_and_boots_the_node_once(bmcs):
    # The BMC answers power commands after 1.6 s: pyghmi's client sends the same request again
    # (after 0.5-1 s). The BMC answers the copy instead of running it: one reset, one netboot.
    b = bmc(bmcs, "bn05")
    bmcs.set_power("bn05", "on")
    bmcs.set_fault("bn05", "lag")
    res = bmc_mod.power(b, "boot", netboot=True, timeout=2 * TIMEOUT, retries=0)
    assert (res.power, res.bootdev, res.attempts) == ("on", "network", 1)
    st = bmcs.state("bn05")
    assert st["duplicates"], "the client never retransmitted: this test did not test anything"
    assert st["actions"] == ["reset"], st
    assert [(b_["how"], b_["bootdev"]) for b_ in st["boots"]] == [("reset", "network")]


def test_reset_or_cycle_while_off_is_0xd5(bmcs, ipmitool):
    b = bmc(bmcs, "bn04")
    for action in ("reset", "cycle"):
        with pytest.raises(BmcStateError, match=rf"{action} is not possible .*0xD5.*power it on"):
            bmc_mod.power(b, action, timeout=TIMEOUT, retries=RETRIES)
    res = ipmitool(bmcs.port("bn04"), "power", "reset", check=False)
    assert res.returncode != 0 and "not supported in present state" in res.stderr
    assert bmcs.state("bn04")["boots"] == []
    # "boot" does the right thing in either state.
    assert bmc_mod.power(b, "boot", netboot=True, timeout=TIMEOUT).power == "on"
    assert bmcs.state("bn04")["boots"][-1]["how"] == "on", bmcs.state("bn04")


def _timed(fn):
    start = time.monotonic()
    try:
        fn()
    except OperationError as exc:
        return exc, time.monotonic() - start
    raise AssertionError("expected an error")


# Not a speed check: a structural bound. Each attempt is cut at TIMEOUT (plus the worker's start-up,
# which is outside the BMC's clock, and the busy back-off); a client that waited on pyghmi's own
# timers or on a hung BMC would blow through it.
BOUND = (RETRIES + 1) * (TIMEOUT + 5.0)


def test_each_fault_has_its_own_error_within_the_timeout(bmcs):
    bmcs.set_fault("bn05", "password")
    bmcs.set_fault("bn06", "silent")
    bmcs.set_fault("bn07", "busy")
    cases = {
        "bn05": BmcAuthError,  # the BMC's password changed
        "bn06": BmcTimeout,
        "bn07": BmcBusy,
    }
    seen = {}
    for name, cls in cases.items():
        exc, elapsed = _timed(lambda: bmc_mod.power(bmc(bmcs, name), "on", timeout=TIMEOUT, retries=RETRIES, node=name))
        assert type(exc) is cls, (name, exc)
        assert elapsed < BOUND, (name, elapsed)
        assert "\n" not in str(exc) and BMC_PASSWORD not in str(exc) and name in str(exc)
        seen[cls] = str(exc)
    assert "wrong user name or password" in seen[BmcAuthError]
    assert f"did not answer within {TIMEOUT:g}s (2 attempts)" in seen[BmcTimeout]
    assert "busy (0xC0) (2 attempts)" in seen[BmcBusy]
    # Wrong credentials on our side (not a fault of the BMC): the same clear error, no retry.
    exc, _ = _timed(lambda: bmc_mod.power(bmc(bmcs, "bn08", password="not-the-password"), "status",
                                       timeout=TIMEOUT, retries=RETRIES))
    assert type(exc) is BmcAuthError and "not-the-password" not in str(exc)
    exc, _ = _timed(lambda: bmc_mod.power(bmc(bmcs, "bn08", user="nobody"), "status", timeout=TIMEOUT))
    assert type(exc) is BmcAuthError
    # Nothing was switched on any faulty BMC.
    assert all(bmcs.state(n)["actions"] == [] for n in cases)
    # The fault cleared: the same BMC works again.
    bmcs.set_fault(["bn05", "bn06", "bn07"], None)
    assert bmc_mod.power(bmc(bmcs, "bn06"), "on", timeout=TIMEOUT).power == "on"


def test_a_power_change_that_does_not_happen_is_an_error(bmcs):
    bmcs.set_fault("bn01", "stuck")
    with pytest.raises(BmcError, match="accepted on but the power is still off"):
        # It waits for the switch for part of the attempt's budget: a longer budget keeps the
        # worker from being cut off first on a busy test machine.
        bmc_mod.power(bmc(bmcs, "bn01"), "on", timeout=2 * TIMEOUT, retries=0)
    assert bmcs.state("bn01")["power"] == "off"


def test_nothing_listens(bmcs):
    from tests.support import free_port
    import socket

    exc, elapsed = _timed(lambda: bmc_mod.power(Bmc("127.0.0.1", free_port(socket.SOCK_DGRAM), "admin", BMC_PASSWORD),
                                             "status", timeout=1.0, retries=0))
    assert isinstance(exc, BmcTimeout) and elapsed < 1.0 + 3.0


def test_busy_then_recovers_within_retries(bmcs):
    # A BMC that is busy once answers on the retry: the caller sees success after 2+ attempts.
    import threading

    bmcs.set_fault("bn08", "busy")

    def clear_after_first_busy():
        deadline = time.monotonic() + 30
        while bmcs.state("bn08")["refused"]["busy"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        bmcs.set_fault("bn08", None)

    clearer = threading.Thread(target=clear_after_first_busy)
    clearer.start()
    try:
        res = bmc_mod.power(bmc(bmcs, "bn08"), "on", timeout=TIMEOUT, retries=3)
    finally:
        clearer.join()
    assert res.power == "on" and res.attempts >= 2
    assert bmcs.state("bn08")["actions"] == ["on"]


def test_standalone_simulator_for_the_demo(tmp_path, ipmitool):
    """`python -m testbed.bmc_sim --site site.yaml` serves one BMC per loopback node, with a hook."""
    import json
    import os
    import signal
    import socket
    import sys

    from testbed.site import write_site
    from tests.support import ROOT, free_port

    ports = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    path = write_site(tmp_path / "site", nodes=[
        {"name": "sn[01-02]", "pool": "shared", "default_role": "slurm",
         "macs": ["52:54:00:08:00:01", "52:54:00:08:00:02"], "bmc": {"address": "127.0.0.1", "port": ports}},
    ])
    hook_out = tmp_path / "hook.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.bmc_sim", "--site", str(path),
         "--on-power", f'echo "$BMC_NODE $BMC_ACTION $BMC_BOOTDEV $BMC_PERSISTENT" >> {hook_out}'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(2):
            assert "BMC sn0" in proc.stderr.readline()
        ipmitool(ports[1], "chassis", "bootdev", "pxe")
        ipmitool(ports[1], "power", "on")
        event = json.loads(proc.stdout.readline())
        assert (event["bmc"], event["action"], event["boot"]["bootdev"]) == ("sn02", "on", "network")
        deadline = time.monotonic() + 10
        while not (hook_out.exists() and hook_out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hook_out.read_text() == "sn02 on network 0\n"
        assert tool_power(ipmitool, ports[0]) == "off"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
