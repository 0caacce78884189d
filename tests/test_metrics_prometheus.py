"""`/metrics` of the real `provisioner serve` (gunicorn, several worker processes): counts made
in different workers add up, also across a worker's replacement; and Debian's real Prometheus
scrapes it, evaluates the example alert rules, and answers PromQL over what it scraped."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from provisioner import config
from provisioner.store import Store
from testbed.boot_server import BootServer, cli
from testbed.process import Daemon, free_port
from testbed.site import mac, write_site
from tests.support import require_binary

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prometheus"
REQUESTS = "provisioner_boot_requests_total"


def start_server(tmp_path: Path, workers: int = 2) -> BootServer:
    """`provisioner serve` with TMPDIR under tmp_path, so the test finds its private metrics folder."""
    port = free_port()
    cfg = write_site(tmp_path / "site", site={"boot_url": f"http://127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"})
    (tmp_path / "tmp").mkdir()
    server = BootServer(cfg, port, tmp_path / "serve.log", workers=workers)
    server.env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    return server.start()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:  # a new connection each time
        return r.read().decode()


def scraped_total(server: BootServer, name: str = REQUESTS) -> float:
    text = get(server.url + "/metrics")
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def per_process_counts(tmp_path: Path) -> dict[int, float]:
    """{pid: boot requests it counted}, read from each process's own multiprocess file."""
    (folder,) = (tmp_path / "tmp").glob("provisioner-metrics-*")
    out = {}
    for f in folder.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        out[pid] = sum(v for key, v, *_ in MmapedDict.read_all_values_from_file(str(f))
                       if json.loads(key)[1] == REQUESTS)
    return out


def test_counts_from_different_workers_add_up(tmp_path):
    server = start_server(tmp_path, workers=2)
    try:
        url = f"{server.url}/ipxe?mac={mac(1, 3)}"
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            # New connections from 8 threads at once: both workers take some. Until each of them has.
            while sent < 4000:
                list(pool.map(lambda _: get(url), range(100)))
                sent += 100
                counts = per_process_counts(tmp_path)
                if sum(1 for v in counts.values() if v > 0) >= 2:
                    break
        busy = {pid: v for pid, v in counts.items() if v > 0}
        assert len(busy) >= 2, f"one worker took all {sent} requests: {counts}"
        assert sum(counts.values()) == sent
        # Whichever worker answers the scrape, it reports the sum over all of them.
        assert [scraped_total(server) for _ in range(6)] == [sent] * 6

        # A worker that gunicorn replaces keeps its counts in the total.
        gone = next(iter(busy))
        os.kill(gone, signal.SIGTERM)  # a worker of the server this test started
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (Path(f"/proc/{gone}").exists()
                                               or server.tail(100_000).count("Booting worker") < 3):
            time.sleep(0.1)
        assert not Path(f"/proc/{gone}").exists() and server.tail(100_000).count("Booting worker") >= 3, \
            server.tail()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: get(url), range(50)))
        sent += 50
        assert per_process_counts(tmp_path)[gone] == busy[gone]  # the dead worker's file stays
        assert [scraped_total(server) for _ in range(4)] == [sent] * 4
        assert scraped_total(server, "provisioner_boot_unexpected_errors_total") == 0
    finally:
        server.stop()
    assert list((tmp_path / "tmp").iterdir()) == []  # the metrics folder is removed at stop


class Prometheus(Daemon):
    def __init__(self, binary: str, folder: Path, target: str, interval: str = "1s"):
        folder.mkdir()
        cfg = folder / "prometheus.yml"
        cfg.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(EXAMPLES / "provisioner-alerts.yml")],
            "scrape_configs": [{"job_name": "provisioner-boot", "static_configs": [{"targets": [target]}]}],
        }))
        port = free_port()
        super().__init__([binary, f"--config.file={cfg}", f"--storage.tsdb.path={folder / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}"], port, folder / "prometheus.log")
        self.url = f"http://127.0.0.1:{port}"

    def query(self, promql: str) -> list[dict]:
        body = json.loads(get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_the_boot_endpoint_and_evaluates_the_alert_rules(tmp_path):
    binary = require_binary("prometheus")
    server = start_server(tmp_path, workers=2)
    prom = Prometheus(binary, tmp_path / "prometheus", f"127.0.0.1:{server.port}")
    try:
        prom.start("/-/ready", timeout=60)
        for _ in range(5):
            get(f"{server.url}/ipxe?mac={mac(1, 3)}")  # sn01: its slurm script
        get(f"{server.url}/ipxe?mac=52:54:00:99:99:99")
        get(f"{server.url}/ipxe?mac=52:54:00:99:99:98")
        get(f"{server.url}/ipxe?mac=hello")
        get(f"{server.url}/boot.ipxe")
        for tok in ("wrong", "also-wrong"):
            req = urllib.request.Request(f"{server.url}/api/v1/nodes/sn01/booted", method="POST",
                                         data=json.dumps({"role": "slurm", "token": tok}).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=10)
            assert refused.value.code == 403
        assert cli(server.config, "role", "sn02", "k8s", "--reason", "metrics test").returncode == 0
        store = Store(config.load(server.config).store)
        store.update("sn03", actor="test", kind="switch", message="switch to k8s requested: test",
                     data={"to": "k8s", "reason": "test", "forced": False}, phase="requested", target_role="k8s")
        store.update("sn03", actor="test", kind="failed", message="switch to k8s FAILED: test", phase="failed",
                     target_role="k8s", failed_reason="test", phase_since=time.time())

        expected = {
            'sum(provisioner_boot_requests_total{outcome="script",role="slurm"})': 5,
            'sum(provisioner_boot_requests_total{outcome="unknown_mac"})': 2,
            'sum(provisioner_boot_requests_total{outcome="bad_mac"})': 1,
            'sum(provisioner_boot_requests_total{outcome="stage1"})': 1,
            'sum(provisioner_boot_requests_total)': 9,
            'sum(provisioner_boot_callbacks_total{result="refused"})': 2,
            'sum(provisioner_boot_callbacks_total{result="accepted"})': 0,
            'provisioner_switches_started_total{to="k8s"}': 2,
            'provisioner_switches_failed_total{to="k8s"}': 1,
            'provisioner_nodes{role="slurm",phase="requested"}': 1,
            'provisioner_nodes{role="slurm",phase="failed"}': 1,
            'sum(provisioner_nodes)': 6,
            'count(provisioner_node_phase_seconds)': 2,
            'provisioner_store_up': 1,
            'up{job="provisioner-boot"}': 1,
            'count(ALERTS{alertname="ProvisionerNodeFailed",alertstate="firing",node="sn03",to="k8s"})': 1,
            'count(ALERTS{alertname="ProvisionerBootEndpointErrors"}) or vector(0)': 0,
        }
        deadline = time.monotonic() + 60
        while True:
            got = {q: prom.scalar(q) for q in expected}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got == expected, f"\n{prom.tail()}\n{server.tail()}"
    finally:
        prom.stop()
        server.stop()
