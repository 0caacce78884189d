"""The files in examples/ work as a site copies them: the units and the cron line run commands the
CLI accepts, as a non-root user, hardened and restarted; the dashboard asks only for metrics the
endpoint exports; the DHCP set-ups hand iPXE the boot path the endpoint serves; the bootstrap
token is one Kubernetes accepts the shape of; the PostgreSQL script makes a role a real server
lets provisioner's store run under."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from provisioner import cli
from provisioner.boot.app import BOOT_PATHS
from provisioner.store import Store
from testbed.process import ROOT

EX = ROOT / "examples"


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


def parses(command: str) -> None:
    """The provisioner command line parses with this version's CLI (exits with 2 otherwise)."""
    argv = shlex.split(command)
    assert argv[0].endswith("/provisioner"), command
    cli.build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("name", ["provisioner-serve.service", "provisioner-prerender.service",
                                  "provisioner-run.service"])
def test_service_units_run_as_a_user_hardened_and_always_restarted(name):
    s = unit(EX / "systemd" / name)["Service"]
    assert s["User"] == "provisioner" and s["Group"] == "provisioner"
    assert s["Restart"] == "always"
    assert (s["NoNewPrivileges"], s["ProtectSystem"], s["ReadWritePaths"]) == ("yes", "strict", "/var/lib/provisioner")
    parses(s["ExecStart"])


def test_timer_service_and_cron_line_run_a_balance_pass_as_the_user():
    s = unit(EX / "cron" / "provisioner-balance.service")["Service"]
    assert s["User"] == "provisioner"
    parses(s["ExecStart"])
    (line,) = [x for x in (EX / "cron" / "provisioner-balance.cron").read_text().splitlines()
               if x.startswith("* ")]
    fields = line.split(None, 6)
    assert fields[5] == "provisioner"
    parses(fields[6].split(">>")[0])


def test_dashboard_asks_only_for_exported_metrics():
    dash = json.loads((EX / "grafana" / "provisioner.json").read_text())
    exported = set(re.findall(r'"(provisioner_[a-z_]+)"', (ROOT / "provisioner" / "boot" / "metrics.py").read_text()))
    asked = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            asked |= set(re.findall(r"\bprovisioner_[a-z_]+", target["expr"]))
    base = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in asked}
    assert base and base <= exported, base - exported


def test_dhcp_setups_send_ipxe_to_the_boot_path_bios_and_uefi():
    kea = json.loads((EX / "dhcp" / "kea-dhcp4.json").read_text())
    files = {c["name"]: c["boot-file-name"] for c in kea["Dhcp4"]["client-classes"]}
    texts = [(EX / "dhcp" / n).read_text() for n in ("dhcpd.conf", "dnsmasq.conf")] + [json.dumps(files)]
    for text in texts:
        assert re.search(r"http://[^\"\s,]+(/boot\.ipxe)", text).group(1) in BOOT_PATHS
        assert "undionly.kpxe" in text and "ipxe.efi" in text  # BIOS and UEFI


def test_bootstrap_token_secret_has_kubernetes_shape():
    s = yaml.safe_load((EX / "kubernetes" / "bootstrap-token-secret.yaml").read_text())
    data = s["stringData"]
    assert s["type"] == "bootstrap.kubernetes.io/token" and s["metadata"]["namespace"] == "kube-system"
    assert s["metadata"]["name"] == f"bootstrap-token-{data['token-id']}"
    assert re.fullmatch(r"[a-z0-9]{6}", data["token-id"]) and re.fullmatch(r"[a-z0-9]{16}", data["token-secret"])


@pytest.mark.integration
def test_postgresql_script_makes_a_role_the_store_runs_under(postgres_server, tmp_path):
    # The session's server already has a superuser named provisioner: the script's names, renamed.
    sql = (EX / "postgresql" / "provisioner.sql").read_text().replace("provisioner", "site_prov")
    script = tmp_path / "site.sql"
    script.write_text(sql)
    password = tmp_path / "db-password"
    password.write_text("a-site-password\n")
    su_password = postgres_server.password_file.read_text().strip()
    r = subprocess.run([str(postgres_server.bin / "psql"), "-v", "ON_ERROR_STOP=1", "-v", "password='a-site-password'",
                        "-f", str(script), postgres_server.url()], capture_output=True, text=True, timeout=60,
                       env={"PGPASSWORD": su_password, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    store = Store(f"postgresql://site_prov@127.0.0.1:{postgres_server.port}/site_prov", password_file=password)
    store.seed([("sn01", "slurm")])
    assert store.get("sn01").desired_role == "slurm"
    with postgres_server.connect("site_prov") as c:
        assert c.execute("SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = 'site_prov'").fetchone() == \
            (False, False)
