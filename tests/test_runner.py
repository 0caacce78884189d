"""`provisioner run`, the long-running balancer (provisioner/runner.py): its config section, its
lock, its log, and, against the simulated site (real slurmctld, the real control plane, BMC
simulators, the real boot endpoint), that an unschedulable pod or a recorded ask starts a pass
long before its timer would, that a switch is carried through by the passes that follow, and
that SIGTERM stops it with exit 0."""

from __future__ import annotations

import io
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from provisioner import cli, config, runner
from provisioner.errors import ConfigError
from provisioner.store import Store
from testbed.simnodes import ROOT, provisioner_cmd
from testbed.site import write_site
from testbed.wait import wait_for


def with_run(path: Path, **run) -> Path:
    """Add (or replace) the site file's run: section."""
    data = yaml.safe_load(path.read_text())
    data["run"] = run
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- config


def test_the_run_section_has_defaults_and_takes_values(tmp_path):
    site = config.load(write_site(tmp_path / "a"))
    assert (site.run.interval_s, site.run.ask_poll_s, site.run.busy_interval_s, site.run.watch_kubernetes) == \
        (60.0, 0.5, 2.0, True)
    site = config.load(write_site(tmp_path / "b", run={"interval_s": 3600, "ask_poll_s": 0.2, "busy_interval_s": 1,
                                                        "watch_kubernetes": False}))
    assert (site.run.interval_s, site.run.ask_poll_s, site.run.busy_interval_s, site.run.watch_kubernetes) == \
        (3600.0, 0.2, 1.0, False)


@pytest.mark.parametrize("run, field, words", [
    ({"interval_s": "soon"}, "run.interval_s", "must be a number"),
    ({"interval_s": 0}, "run.interval_s", "must be >= 1"),
    ({"ask_poll_s": 0}, "run.ask_poll_s", "must be >= 0.1"),
    ({"interval_s": 60, "busy_interval_s": 120}, "run.busy_interval_s", "must not be longer than run.interval_s"),
    ({"watch_kubernetes": "yes"}, "run.watch_kubernetes", "must be true or false"),
    ({"watch": True}, "run.watch", "unknown field"),
])
def test_run_section_errors_name_the_file_and_the_field(tmp_path, capsys, run, field, words):
    path = write_site(tmp_path, run=run)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert str(exc.value).startswith(f"{path}: {field}: ") and words in str(exc.value)
    assert cli.main(["--config", str(path), "check"]) == 2
    assert capsys.readouterr().err == f"provisioner: config error: {exc.value}\n"


def test_the_example_site_documents_the_run_section():
    site = config.load(ROOT / "examples" / "site.yaml")
    assert "run" in yaml.safe_load((ROOT / "examples" / "site.yaml").read_text())
    assert site.run.interval_s == 60 and site.run.watch_kubernetes


# --------------------------------------------------------------------------- what woke a pass


def test_what_woke_a_pass_in_words():
    assert runner.describe([]) == "timer"
    assert runner.describe([], "switch in progress") == "switch in progress"
    assert runner.describe([("start", "", ""), ("ask", "slurmctld", "sn01 resume"),
                            ("ask", "slurmctld", "sn02 resume"), ("pod", "", "ml/web-0")]) == \
        "start; ask from slurmctld: sn01 resume, sn02 resume; unschedulable pod ml/web-0"
    pods = [("pod", "", f"ml/web-{i}") for i in range(5)]
    assert runner.describe(pods) == "unschedulable pods ml/web-0, ml/web-1, ml/web-2 (+2 more)"
    assert runner.describe([("provreq", "", "ml/train-1")]) == "ProvisioningRequest ml/train-1"


# --------------------------------------------------------------------------- the loop, without clusters


@pytest.fixture
def offline_site(tmp_path):
    """A site whose clusters cannot be reached: no kubeconfig, no SLURM commands. Every pass
    fails to observe; the loop must go on."""
    path = write_site(tmp_path / "site", slurm={"bin_dir": str(tmp_path / "no-slurm")},
                      kubernetes={"kubeconfig": str(tmp_path / "no-kubeconfig")},
                      run={"interval_s": 3600, "ask_poll_s": 0.1, "busy_interval_s": 1})
    return config.load(path)


def test_the_loop_wakes_on_an_ask_goes_on_after_failed_passes_and_holds_the_site(offline_site, capsys):
    site = offline_site
    assert not runner.daemon_running(site)
    stop, out = threading.Event(), io.StringIO()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run(site, stop=stop, out=out)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "pass (start):" in out.getvalue(), 60, "the first pass")
        assert runner.daemon_running(site)
        # The first pass could not observe: logged in `provisioner balance`'s words, and the loop goes on.
        assert "error: observe failed, no action taken: " in out.getvalue()

        Store(site.store).add_asks(["sn01"], "resume", source="slurmctld", reason="ResumeProgram", actor="slurmctld")
        wait_for(lambda: "pass (ask from slurmctld: sn01 resume):" in out.getvalue(), 60, "a pass woken by the ask")

        # One loop per site: a second one, in-process and through the CLI, is refused.
        with pytest.raises(runner.AlreadyRunning, match="`provisioner run` is already running for"):
            runner.run(site, stop=threading.Event(), out=io.StringIO())
        assert cli.main(["--config", str(site.path), "run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"provisioner: `provisioner run` is already running for {site.path} (pid ")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result == [0] and not runner.daemon_running(site)
    lines = out.getvalue().splitlines()
    assert lines[-1].endswith("provisioner run: stopped")
    # The timer (an hour) never fired: every pass says what woke it (a failed pass is tried again
    # after run.interval_s or 10 s, whichever is shorter).
    passes = [line.split(" ", 1)[1].split(":", 1)[0] for line in lines if " pass (" in line]
    assert [p for p in passes if p != "pass (retry)"] == ["pass (start)", "pass (ask from slurmctld"], passes


# --------------------------------------------------------------------------- the daemon, on the simulated site


def start_run(sim, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([*provisioner_cmd(), "--config", str(sim.config), "run"], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)


@pytest.mark.integration
def test_run_reacts_to_an_unschedulable_pod_and_to_an_ask_and_stops_on_sigterm(balance_site, tmp_path):
    sim = balance_site()  # every shared node idle in SLURM
    with_run(sim.config, interval_s=3600, busy_interval_s=1)  # the timer would fire in an hour
    site = config.load(sim.config)
    log = tmp_path / "run.log"
    proc = start_run(sim, log)
    try:
        wait_for(lambda: "pass (start):" in log.read_text(), 60, "the daemon's first pass")
        assert runner.daemon_running(site)
        second = sim.cli("run", timeout=60)
        assert second.returncode == 2 and "`provisioner run` is already running for" in second.stderr, second.stderr

        # Kubernetes is full: a pod the scheduler cannot place moves a shared node.
        sim.kube.add_pod("big-0", node="kn01", requests={"cpu": "1", "memory": "128Mi"})
        sim.kube.add_pod("web-0", namespace="ml")
        wait_for(lambda: sim.events(["sn01"], kinds=["switch"]), 60, "the daemon to request a switch of sn01")
        # The pass that did it is logged once it ends, with what woke it.
        wait_for(lambda: "pass (unschedulable pod ml/web-0):" in log.read_text(), 60, "the pass's log")
        assert sim.state("sn01").target_role == "k8s" or sim.state("sn01").desired_role == "k8s"

        # The switch goes on over the next passes (drain, reboot, boot, join), no timer needed.
        def done() -> bool:
            pod = sim.kube.pod("web-0", "ml") or {}
            return sim.state("sn01").phase == "steady" and (pod.get("spec") or {}).get("nodeName") == "sn01"

        wait_for(done, 120, "sn01 to serve Kubernetes and web-0 to run there")
        assert sim.serving("sn01") == {"k8s"}

        # slurmctld's ResumeProgram records an ask: a pass answers it.
        sim.store.add_asks(["sn02"], "resume", source="slurmctld", reason="ResumeProgram", actor="slurmctld")
        # (other things may wake the same pass: "pass (...; ask from slurmctld: sn02 resume...)")
        try:
            wait_for(lambda: "ask from slurmctld: sn02 resume" in log.read_text(), 120, "a pass woken by the ask")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the daemon's log ends:\n{log.read_text()[-3000:]}") from None

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.rstrip().endswith("provisioner run: stopped (SIGTERM)"), text[-3000:]
    assert not runner.daemon_running(site)
    assert " pass (timer)" not in text
    # The log has balance's lines: the move and the switch's steps.
    assert "move sn01 -> k8s: " in text and "sn01: draining: " in text
