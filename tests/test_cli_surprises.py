"""The CLI as an admin meets it: each command as typed, its exit code and its one line on
stderr. Listings change no file (the state folder is snapshotted around each); usage errors
are one line with an example; config errors come all at once; `power` refuses nodes that run
work, seen through the real slurmctld and the real Kubernetes control plane."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from provisioner import cli as climod
from provisioner import workload
from provisioner.model import Node
from testbed.boot_server import cli as cli_process
from testbed.site import write_site

UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


class Run:
    """What the user saw: the exit code, stdout and stderr of `provisioner --config PATH ARGS...`
    (in this process: the same main() the command runs, without the start-up cost)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    def run(config: Path, *args: str) -> Run:
        capsys.readouterr()
        code = climod.main(["--config", str(config), *args])
        out, err = capsys.readouterr()
        return Run(code, out, err)
    return run


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under folder: its bytes' hash, its mode and its modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode,
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def site_path(tmp_path) -> Path:
    return write_site(tmp_path / "site")


# --------------------------------------------------------------------------- usage errors


USAGE = [
    (["render", "sn01", "--mac", "zz"], "provisioner render: argument --mac: not a MAC address: 'zz'"),
    (["nginx-config", "--scripts", "/srv/ipxe", "--upstream", "bogus"],
     "provisioner nginx-config: argument --upstream: must be HOST:PORT, got 'bogus'"),
    (["history", "--limit", "-1"], "provisioner history: argument --limit: must be 0 or more, got -1"),
    (["balance", "--wait", "soon"], "provisioner balance: argument --wait: must be a number of seconds"),
    (["prerender", "/tmp/x", "--interval", "0"], "provisioner prerender: argument --interval: must be more than 0"),
    (["serve", "--workers", "0"], "provisioner serve: argument --workers: must be 1 or more"),
    (["power", "sn01", "explode"], "provisioner power: argument action: invalid choice: 'explode'"),
    (["render"], "provisioner render: the following arguments are required: NODESET"),
    (["nodes", "sn[01-"], "provisioner: bad hostlist expression 'sn[01-'"),
    (["nodes", "@gpu"], "provisioner: unknown group @gpu"),
    (["render", "sn[01-09]"], "provisioner: unknown node(s) sn[05-09]"),
]


@pytest.mark.parametrize("argv,start", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line_with_the_right_form(cli, site_path, argv, start):
    r = cli(site_path, *argv)
    line = one_line(r)
    assert r.returncode == 2 and line.startswith(start), line
    # What to type instead: an example command, or the node-set forms.
    assert "(e.g. `provisioner " in line or "'sn[01-04,07]'" in line or "see `provisioner nodes`" in line, line


def test_every_config_error_at_once_each_naming_file_and_field(cli, tmp_path):
    path = write_site(tmp_path / "site")
    data = yaml.safe_load(path.read_text())
    data["site"]["listen"] = "nowhere"
    data["policy"] = {"flap_window_s": "soon"}
    data["nodes"][0]["macs"] = ["zz", "52:54:00:01:00:02"]
    data["nodes"][1]["pool"] = "gpu"
    path.write_text(yaml.safe_dump(data))
    r = cli(path, "check")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert [line.split(": ")[3] for line in lines] == ["site.listen", "policy.flap_window_s", "nodes[0].macs[0]",
                                                      "nodes[1].pool"], lines
    assert all(line.startswith(f"provisioner: config error: {path}: ") for line in lines)

    r = cli(Path("/dev/null"), "check")
    assert r.returncode == 2
    assert [line.split(": ")[3] for line in r.stderr.strip().splitlines()] == \
        ["site.boot_url", "images.slurm", "images.k8s", "nodes"]


# --------------------------------------------------------------------------- listings only read


LISTINGS = [["nodes"], ["nodes", "@shared", "--json"], ["history"], ["history", "sn01", "--json"],
            ["render", "sn[01-02]"], ["check"], ["image", "list"]]


def listings_read_only(cli, site_path: Path, state, store: bool) -> None:
    """Every listing, with state() (the files, the database) the same after each: with no store
    (store=False) `check` passes and the others say in one line that `provisioner init` makes it."""
    before = state()
    for argv in LISTINGS:
        r = cli(site_path, *argv)
        if store or argv[0] == "check":
            assert r.returncode == 0, (argv, r.stderr)
        else:
            assert r.returncode == 2 and "`provisioner init` creates it" in one_line(r), (argv, r.stderr)
        assert state() == before, argv


def test_listings_never_create_the_store_or_the_secret(cli, site_path):
    listings_read_only(cli, site_path, lambda: snapshot(site_path.parent), store=False)


def test_listings_change_no_file(cli, site_path):
    folder = site_path.parent
    assert cli(site_path, "init").returncode == 0
    assert cli(site_path, "role", "sn01", "k8s", "--reason", "course").returncode == 0
    listings_read_only(cli, site_path, lambda: snapshot(folder), store=True)


def pg_content(url: str, password_file: Path) -> dict:
    """Every table of the database with all its rows: the whole of a PostgreSQL store."""
    import psycopg

    with psycopg.connect(url, password=password_file.read_text().strip()) as c:
        tables = [r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        return {t: c.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall() for t in tables}


@pytest.mark.integration
def test_listings_never_create_or_change_a_postgresql_store(cli, tmp_path, pg_url):
    """The same on the real PostgreSQL server: no table made, no migration, no row changed (the
    listings' sessions are read-only), and a missing or old store is one line naming init."""
    from provisioner.store import SCHEMA_VERSION

    url, pw = pg_url
    site_path = write_site(tmp_path / "site", site={"store": url, "store_password_file": str(pw),
                                                    "state_dir": str(tmp_path / "state")})
    assert pg_content(url, pw) == {}
    listings_read_only(cli, site_path, lambda: (pg_content(url, pw), snapshot(tmp_path)), store=False)
    assert one_line(cli(site_path, "nodes")) == (f"provisioner: no store at {url} yet (site.store): `provisioner init` "
                                                 f"creates it (so do `serve`, `balance` and `run`)")

    assert cli(site_path, "init").returncode == 0
    assert cli(site_path, "role", "sn01", "k8s", "--reason", "course").returncode == 0
    assert cli(site_path, "hold", "sn02", "--reason", "DIMM swap").returncode == 0
    listings_read_only(cli, site_path, lambda: (pg_content(url, pw), snapshot(tmp_path)), store=True)

    # A store an older provisioner made: listed only once `init` migrated it.
    import psycopg

    with psycopg.connect(url, password=pw.read_text().strip(), autocommit=True) as c:
        c.execute("UPDATE provisioner_schema SET version = %s", (SCHEMA_VERSION - 1,))
    content = pg_content(url, pw)
    r = cli(site_path, "nodes")
    assert r.returncode == 2 and one_line(r) == (f"provisioner: store {url} has schema version {SCHEMA_VERSION - 1}, "
                                                 f"this provisioner reads {SCHEMA_VERSION}: `provisioner init` "
                                                 f"migrates it")
    assert pg_content(url, pw) == content

    # No database at all: one line, what to do.
    gone = write_site(tmp_path / "gone", site={"store": url.rsplit("/", 1)[0] + "/nosuchdb",
                                              "store_password_file": str(pw), "state_dir": str(tmp_path / "state")})
    r = cli(gone, "history")
    assert r.returncode == 1 and "does not exist" in one_line(r) and "then `provisioner init`" in one_line(r)


# --------------------------------------------------------------------------- nodes


def test_nodes_shows_target_age_and_reason_filters_and_pools(cli, site_path):
    assert cli(site_path, "init").returncode == 0
    assert cli(site_path, "role", "sn02", "k8s", "--reason", "GPU course").returncode == 0
    r = cli(site_path, "nodes", "@shared", "--phase", "requested")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NODE", "POOL", "DESIRED", "BOOTED", "TARGET", "PHASE", "AGE", "PINNED", "REASON"]
    assert len(lines) == 2
    cells = lines[1].split(None, 8)
    assert cells[:6] == ["sn02", "shared", "slurm", "-", "k8s", "requested"] and re.match(r"^\d+s$", cells[6])
    assert cells[7:] == ["yes", "GPU course"]

    assert [line.split()[0] for line in cli(site_path, "nodes", "--pool", "slurm").stdout.splitlines()[1:]] == \
        ["cn01", "cn02"]
    assert [line.split()[0] for line in cli(site_path, "nodes", "cn01,@shared").stdout.splitlines()[1:]] == \
        ["cn01", "sn01", "sn02", "sn03", "sn04"]

    (row,) = json.loads(cli(site_path, "nodes", "sn02", "--json").stdout)
    assert (row["phase"], row["target_role"], row["attempts"]) == ("requested", "k8s", 0)
    assert UTC_STAMP.match(row["phase_since"]), row["phase_since"]
    events = json.loads(cli(site_path, "history", "sn02", "--json").stdout)
    assert events and all(UTC_STAMP.match(e["time"]) for e in events)


# --------------------------------------------------------------------------- parser


def _actions(parser: argparse.ArgumentParser, path: str = "provisioner"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_and_positional_has_help_and_node_sets_have_one_name():
    parser = climod.build_parser()
    missing = [f"{path} {a.option_strings or a.dest}" for path, a in _actions(parser) if not a.help]
    assert missing == []
    node_args = [(path, a.dest, a.metavar) for path, a in _actions(parser)
                 if not a.option_strings and a.dest in ("nodeset", "node", "hostlist", "nodes")]
    assert node_args and {(dest, metavar) for _, dest, metavar in node_args} == {("nodeset", "NODESET")}
    reasons = {path: a.default for path, a in _actions(parser) if "--reason" in a.option_strings}
    assert set(reasons) >= {"provisioner role", "provisioner release", "provisioner image publish",
                            "provisioner image remove", "provisioner image pin", "provisioner image unpin"}
    # Optional everywhere, with a default that says who; but a hold's reason is what nodes,
    # SLURM and Kubernetes show for the whole maintenance: no default could say it.
    assert reasons.pop("provisioner hold") is None
    assert all(reasons.values())


def test_shell_completion_is_generated_from_the_parser(cli, site_path):
    r = cli(site_path, "completion", "bash")
    assert r.returncode == 0 and "--force" in r.stdout and "nginx-config" in r.stdout


# --------------------------------------------------------------------------- power refuses work


def test_refusals_name_the_work_and_treat_an_unreadable_cluster_as_busy():
    nodes = [Node(name=n, pool=p, default_role="slurm" if p != "k8s" else "k8s", macs=()) for n, p in
             (("sn01", "shared"), ("sn02", "shared"), ("cn01", "slurm"), ("kn01", "k8s"))]
    work = workload.Work(jobs={"sn01": ["41", "42"]}, pods={"kn01": ["default/web-1"]})
    assert workload.refusals(nodes, work) == {"sn01": "runs job(s) 41, 42", "kn01": "runs pod(s) default/web-1"}
    blind = workload.Work(unknown={"kubernetes": "no kubeconfig"})
    refused = workload.refusals(nodes, blind)
    assert set(refused) == {"sn01", "sn02", "kn01"}  # cn01 is SLURM's only
    assert refused["sn02"] == "may run pods (Kubernetes cannot be read: no kubeconfig)"


@pytest.mark.integration
def test_power_off_refuses_a_shared_node_that_runs_a_job_unless_forced(slurm_cluster, kube, tmp_path):
    slurm_cluster.reset_nodes()
    path = write_site(tmp_path / "site", slurm=slurm_cluster.site_section(),
                      kubernetes={"kubeconfig": str(kube.provisioner_kubeconfig), "timeout_s": 5},
                      power={"timeout_s": 1, "retries": 0})
    for name in ("sn01", "sn02", "sn03"):
        kube.add_node(name, labels={"sched": "slurm"})
    job = slurm_cluster.sbatch(nodelist="sn01")
    slurm_cluster.wait_job_running(job)
    kube.add_pod("web-1", node="sn02")

    for action in ("off", "reset", "cycle", "soft"):
        r = cli_process(path, "power", "sn[01-03]", action)
        line = one_line(r)
        assert r.returncode == 1, r.stderr
        assert line.startswith(f"provisioner: failed: not going to power {action} sn[01-02]: "
                               f"sn01 runs job(s) {job}; sn02 runs pod(s) default/web-1;"), line
        assert "--force" in line
    # Nothing was attempted, nothing recorded.
    assert cli_process(path, "init").returncode == 0
    assert not [e for e in json.loads(cli_process(path, "history", "--json").stdout) if e["kind"] == "power"]
    # sn03 runs nothing: it passes the check (its BMC is not there, so the action itself fails).
    r = cli_process(path, "power", "sn03", "off")
    assert "not going to" not in r.stderr and "power off failed on sn03" in r.stderr
    # --force skips the check: the action is attempted.
    r = cli_process(path, "power", "sn01", "off", "--force")
    assert "not going to" not in r.stderr and "power off failed on sn01" in r.stderr
    assert slurm_cluster.job_state(job)[0] == "RUNNING"  # the fake BMC never cut it
