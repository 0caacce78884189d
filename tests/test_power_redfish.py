"""provisioner.power over Redfish (pyghmi's client) against sushy-tools' emulator: its libvirt
driver powering a real qemu VM under our libvirtd, and its fake driver for the faults; the
emulator's own answers (read with urllib, verified against the test CA) as the second client."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

from provisioner.model import Bmc
from provisioner.power import bmc as bmc_mod
from provisioner.power.bmc import BmcAuthError, BmcError, BmcServerError, BmcTimeout, BmcTlsError
from provisioner.store import Store
from testbed.pki import CA
from testbed.redfish_bmc import PASSWORD, RedfishBmc
from testbed.tcp_gate import TcpGate
from tests.fixtures.bmc import BMC_PASSWORD
from tests.fixtures.redfish import redfish_bmc_entry, redfish_site
from tests.support import ROOT

pytestmark = pytest.mark.integration

PROVISIONER = str(ROOT / ".venv" / "bin" / "provisioner")
TIMEOUT, RETRIES, SETTLE = 5.0, 1, 30.0


def rf_bmc(rf: RedfishBmc, system: str, port: int | None = None, **fields) -> Bmc:
    return Bmc("127.0.0.1", port or rf.port, rf.user, fields.pop("password", rf.password), protocol="redfish",
               ca_file=fields.pop("ca_file", str(rf.ca_file)), system=system, **fields)


def power(b: Bmc, action: str, netboot: bool = False, **kw):
    kw = {"timeout": TIMEOUT, "retries": RETRIES, "settle_s": SETTLE, **kw}
    return bmc_mod.power(b, action, netboot=netboot, node="n1", **kw)


def test_every_action_on_a_libvirt_vm_through_the_emulator(redfish_vm):
    rf, vm = redfish_vm
    b = rf_bmc(rf, vm.uuid, boot_mode="legacy")  # the VM's firmware is SeaBIOS
    vm.power_off()
    assert power(b, "status").power == "off" == rf.system_power(vm.uuid)

    mark = vm.serial_mark()
    res = power(b, "on", netboot=True)
    assert (res.power, res.bootdev, res.protocol) == ("on", "network", "redfish")
    assert vm.is_running() and vm.qemu_pid()
    assert rf.system(vm.uuid)["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    # It network-booted: the firmware's iPXE took the boot file from the DHCP of its network.
    vm.wait_for_serial(r"Filename: http://10\.0\.2\.2:9/nothing-here\.ipxe", 120, since=mark)

    first = vm.domain_id()
    assert power(b, "reset", netboot=True).power == "on"
    assert vm.domain_id() != first  # the emulator's ForceRestart: a new qemu
    assert power(b, "off").power == "off" and not vm.is_running()
    assert power(b, "boot", netboot=True).power == "on" and vm.is_running()  # off -> on
    before = vm.domain_id()
    assert power(b, "cycle").power == "on" and vm.domain_id() != before
    soft = power(b, "soft")  # an ACPI request: iPXE ignores it; not waited for
    assert soft.power in ("on", "off")
    vm.power_off()
    assert power(b, "status").power == "off"


def test_fake_systems_and_the_override_read_back(redfish_fake):
    rf = redfish_fake
    sid = rf.system_id("rf01")
    res = power(rf_bmc(rf, sid), "on", netboot=True)  # the fake BMC shows it 1 to 11 s later
    assert (res.power, res.bootdev) == ("on", "network") and rf.system_power("rf01") == "on"
    # UefiHttp with the node's boot URL where the BMC offers it (this one does, in UEFI mode)
    system = rf.system("rf01")["Boot"]
    assert "UefiHttp" in system["BootSourceOverrideTarget@Redfish.AllowableValues"]
    # No system named: the BMC serves three, so it must be named
    with pytest.raises(BmcError, match="lists 3 systems; name the node's in bmc.system"):
        power(rf_bmc(rf, None), "status")
    with pytest.raises(BmcError, match="no system 'nope' here"):
        power(rf_bmc(rf, "nope"), "status")


def test_a_wrong_password_fails_at_once_and_is_never_shown(redfish_fake):
    rf = redfish_fake
    wrong = "Wr0ng-rf-password"
    with pytest.raises(BmcAuthError) as err:
        power(rf_bmc(rf, rf.system_id("rf02"), password=wrong), "reset", netboot=True)
    text = str(err.value)
    assert "refused the login of user 'admin'" in text and "bmc.password_file" in text
    assert wrong not in text and PASSWORD not in text
    assert err.value.kind == "auth"


def test_tls_is_checked_against_the_ca_file(redfish_fake, tmp_path):
    rf = redfish_fake
    other = CA.create(tmp_path / "other-ca", "some-other-ca")
    with pytest.raises(BmcTlsError, match="certificate was refused .*bmc.ca_file"):
        power(rf_bmc(rf, rf.system_id("rf03"), ca_file=str(other.cert)), "status")
    # insecure: no check at all (`provisioner check` warns about it)
    assert power(rf_bmc(rf, rf.system_id("rf03"), ca_file=None, insecure=True), "status").power in ("on", "off")


def test_a_bmc_that_does_not_answer_is_retried_then_fails(redfish_fake):
    rf = redfish_fake
    gate = TcpGate(rf.port).start()
    try:
        gate.hold()  # connections accepted, never answered
        with pytest.raises(BmcTimeout, match=r"did not answer within .*\(2 attempts\)"):
            power(rf_bmc(rf, rf.system_id("rf03"), port=gate.port), "status", timeout=1.0, settle_s=0.5)
    finally:
        gate.stop()


def test_a_stopped_emulator_then_back(tmp_path):
    rf = RedfishBmc(tmp_path / "rf", fake=["rs01"]).start()
    try:
        b = rf_bmc(rf, rf.system_id("rs01"))
        rf.stop()
        with pytest.raises(BmcTimeout, match=r"did not answer .*Connection refused.*\(2 attempts\)"):
            power(b, "on")
        rf.start()
        assert power(b, "status").power == "off"
    finally:
        rf.stop()


def test_a_5xx_is_retried_then_fails(tmp_path):
    """The emulator's libvirt driver with no libvirtd behind it: the Redfish service answers 500."""
    rf = RedfishBmc(tmp_path / "rf", libvirt_uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock").start()
    try:
        with pytest.raises(BmcServerError, match=r"the Redfish service failed \(HTTP 500.*\(2 attempts\)"):
            power(rf_bmc(rf, "any"), "status")
    finally:
        rf.stop()


def test_an_action_the_bmc_never_finishes_fails_with_the_reason(redfish_fake):
    """The fake driver applies a power change at int(now) + 1..11 s after accepting it. Asked
    just after a whole second, the change is at least about 0.9 s away, and settle_s is 0.01 s:
    the action cannot have finished when provisioner stops waiting."""
    rf = redfish_fake
    b = rf_bmc(rf, rf.system_id("rf03"))
    if rf.system_power("rf03") == "on":
        power(b, "off")
    time.sleep(1.0 - time.time() % 1.0 + 0.02)  # the start of the next second (see the docstring)
    with pytest.raises(BmcError, match=r"accepted on but the power is still off after power.settle_s; the BMC's "
                                       r"task did not finish"):
        power(b, "on", settle_s=0.01)


def test_provisioner_power_drives_both_protocols_in_parallel(tmp_path, bmcs, redfish_fake):
    """One site, IPMI and Redfish nodes side by side: `provisioner power` powers them all at once,
    says which protocol each used, records events, and shows no password anywhere."""
    rf = redfish_fake
    ipmi_nodes = [{"name": n, "pool": "shared", "default_role": "slurm", "macs": [f"52:54:00:0a:00:0{i}"],
                   "bmc": {"address": "127.0.0.1", "port": bmcs.port(n)}} for i, n in enumerate(["bn01", "bn02"], 1)]
    bad = tmp_path / "wrong-password"
    bad.write_text("Wr0ng-rf-password\n")
    wrong = {"name": "rf03", "pool": "shared", "default_role": "slurm", "macs": ["52:54:00:0a:00:09"],
             "bmc": redfish_bmc_entry(rf, rf.system_id("rf03"), password_file=str(bad))}
    path = redfish_site(tmp_path / "site", rf, ["rf01", "rf02"], extra_nodes=ipmi_nodes + [wrong],
                        power={"timeout_s": 5.0, "retries": 1, "fanout": 8, "settle_s": 30})

    def cli(*args):
        return subprocess.run([PROVISIONER, "--config", str(path), *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)

    # --force: this site has no SLURM or Kubernetes to ask whether the nodes run work
    r = cli("power", "bn[01-02],rf[01-03]", "boot", "--netboot", "--json", "--force")
    assert r.returncode == 1, r.stderr
    results = {x["node"]: x for x in json.loads(r.stdout)}
    assert {n: (x["protocol"], x["method"], x["ok"]) for n, x in results.items()} == {
        "bn01": ("ipmi", "ipmi", True), "bn02": ("ipmi", "ipmi", True),
        "rf01": ("redfish", "redfish", True), "rf02": ("redfish", "redfish", True),
        "rf03": ("redfish", "redfish", False)}
    assert results["rf03"]["error_kind"] == "auth"
    assert all(results[n]["state"] == "on" and results[n]["netboot"] for n in ("bn01", "bn02", "rf01", "rf02"))
    assert rf.system_power("rf01") == rf.system_power("rf02") == "on"
    assert bmcs.state("bn01")["power"] == "on"
    assert "rf03" in r.stderr
    table = cli("power", "bn01,rf01", "status")
    assert table.returncode == 0 and re.search(r"rf01\s+status\s+ok\s+on\s+redfish", table.stdout), table.stdout

    # No password in any output, event, log or check.
    check = cli("check")
    events = Store(tmp_path / "site" / "state.db").events()
    assert {e.node for e in events} >= {"bn01", "rf01", "rf03"}
    seen = "\n".join([r.stdout, r.stderr, table.stdout, table.stderr, check.stdout, check.stderr,
                      *(f"{e.message} {json.dumps(e.data)}" for e in events)])
    for secret in (PASSWORD, BMC_PASSWORD, "Wr0ng-rf-password"):
        assert secret not in seen
    log = (rf.workdir / "sushy-emulator.log").read_text()
    assert PASSWORD not in log and "Wr0ng-rf-password" not in log


def test_check_warns_about_insecure_bmcs(tmp_path, redfish_fake):
    rf = redfish_fake
    path = redfish_site(tmp_path / "site", rf, ["rf01"])
    data = yaml.safe_load(path.read_text())
    del data["nodes"][0]["bmc"]["ca_file"]
    data["nodes"][0]["bmc"]["insecure"] = True
    path.write_text(yaml.safe_dump(data))
    r = subprocess.run([PROVISIONER, "--config", str(path), "check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Redfish BMCs of rf01 are reached without checking their TLS certificate" in r.stderr
