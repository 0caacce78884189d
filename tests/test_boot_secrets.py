"""The overlay's secrets reach the booting node only (docs/security.md), written as the attacks:
a user process on the node (an unprivileged account: it knows the MAC, can ask for the script
and read /proc/cmdline), root on the node while it boots, another node; and a fuzz of raw
requests. Each runs against the app alone (`provisioner serve`) and the recommended nginx
deployment (testbed/boot_nginx.py: nginx + prerender + `serve --behind-proxy`).

The node is played from this host: sn01's address is 127.0.0.1. Its secret is the built tiny
image's optional `node-secret` (mode 0400), named by the site's overlay.files.node_secret.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner import config
from provisioner.store import Store
from testbed.boot_nginx import BootNginx, nginx_binary
from testbed.boot_server import BootServer
from testbed.process import free_port
from testbed.site import mac
from testbed.tinyimage import clone_root, tiny_site
from testbed.wait import wait_for
from tests.support import missing

pytestmark = pytest.mark.integration

NOBODY = 65534
ROOT_PORTS = iter(range(700, 1000))  # privileged source ports, one per request (no TIME_WAIT clash)


class Deployment:
    def __init__(self, kind: str, folder: Path, image_root: Path, secret: bytes):
        self.kind, self.folder = kind, folder
        self.port = free_port()
        files = folder / "files"
        files.mkdir(parents=True)
        (files / "node-secret").write_bytes(secret)
        nodes = [{"name": "sn01", "pool": "shared", "mac": mac(1, 3), "ip": "127.0.0.1", "bmc": {"address": "127.0.0.1"}},
                 {"name": "sn02", "pool": "shared", "mac": mac(2, 3), "ip": "10.0.3.2", "bmc": {"address": "127.0.0.1"}},
                 {"name": "sn03", "pool": "shared", "mac": mac(3, 3), "bmc": {"address": "127.0.0.1"}}]
        self.config = tiny_site(folder / "site", image_root, nodes=nodes,
                                site={"boot_url": f"http://127.0.0.1:{self.port}", "listen": f"127.0.0.1:{self.port}"},
                                overlay={"files": {"node_secret": str(files / "node-secret")}})
        self.site = config.load(self.config)
        self.store = Store(self.site.store)
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "nginx":
            self.server = BootNginx(self.config, self.port, folder / "deploy").start()
            self.logs = [folder / "deploy" / "serve.log", folder / "deploy" / "prerender.log",
                         self.server.access_log, folder / "deploy" / "nginx" / "error.log"]
        else:
            self.server = BootServer(self.config, self.port, folder / "serve.log").start()
            self.logs = [folder / "serve.log"]

    def open_window(self, node: str) -> None:
        """An admin-requested boot (what `provisioner power NODE reset` records)."""
        self.store.grant_boot([node], actor="test", reason="test boot")
        self.settled(node)

    def settled(self, node: str) -> None:
        """Behind nginx: the watcher has seen the window (the node's file is gone: the app answers)."""
        if self.kind == "nginx":
            path = self.server.scripts / f"{self.site.nodes[node].macs[0]}.ipxe"
            wait_for(lambda: not path.exists(), 10, f"prerender to hand {node}'s script to the app")

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture(scope="module", params=["app", "nginx"])
def dep(request, tiny_image, tmp_path_factory):
    if request.param == "nginx" and nginx_binary() is None:
        missing("nginx (Debian nginx-light; make system-deps)")
    base = tmp_path_factory.mktemp(f"secrets-{request.param}")
    d = Deployment(request.param, base, clone_root(tiny_image, base), secrets.token_bytes(48))
    d.secret = (base / "files" / "node-secret").read_bytes()
    try:
        yield d
    finally:
        d.server.stop()


# --------------------------------------------------------------------------- clients


def raw(port: int, request: bytes, source_port: int | None = None) -> tuple[int | None, bytes]:
    """One raw HTTP request from this host (as root: `source_port` may be privileged)."""
    s = socket.socket()
    s.settimeout(15)
    try:
        if source_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", source_port))
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        return None, b""
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.\d (\d{3})", head)
    return (int(m.group(1)) if m else None), body


def get(dep: Deployment, path: str, source_port: int | None = None) -> tuple[int | None, bytes]:
    return raw(dep.port, f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode(), source_port)


def as_root(dep: Deployment, path: str) -> tuple[int | None, bytes]:
    """What the image's /init does: from a privileged source port."""
    return get(dep, path, next(ROOT_PORTS))


USER_SCRIPT = r"""
import encodings.idna, json, os, socket, sys, urllib.request, urllib.error  # before dropping root: nobody cannot read them later
os.setgid(65534); os.setuid(65534)
port, paths = int(sys.argv[1]), json.loads(sys.argv[2])
out = {"bind": None, "answers": []}
s = socket.socket()
try:
    s.bind(("127.0.0.1", 700))
    out["bind"] = "bound"
except OSError as exc:
    out["bind"] = type(exc).__name__
s.close()
for path in paths:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
            out["answers"].append([r.status, r.read().decode("latin1")])
    except urllib.error.HTTPError as exc:
        out["answers"].append([exc.code, exc.read().decode("latin1")])
print(json.dumps(out))
"""


def as_user(dep: Deployment, *paths: str) -> tuple[str, list[tuple[int, bytes]]]:
    """A process of an unprivileged account (nobody) on the node: (what binding a privileged
    port gave, [(status, body)] for each GET)."""
    r = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(dep.port), json.dumps(list(paths))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    return out["bind"], [(c, b.encode("latin1")) for c, b in out["answers"]]


def script_of(body: bytes) -> dict[str, str]:
    """The kernel arguments of a node's script."""
    line = next(x for x in body.decode().splitlines() if x.startswith("kernel "))
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def secrets_path(args: dict[str, str], token: str | None = None) -> str:
    url = args["provisioner.secrets"]
    return url[url.index("/overlay/"):] + f"?token={token or args['provisioner.token']}"


def unpack(body: bytes) -> bytes:
    return gzip.decompress(base64.b64decode(body))


def callback(dep: Deployment, node: str, token: str) -> int | None:
    body = f"role=slurm&token={token}".encode()
    return raw(dep.port, f"POST /api/v1/nodes/{node}/booted HTTP/1.0\r\nHost: x\r\nContent-Type: "
                         f"application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)[0]


def assert_no_secret(dep: Deployment, *texts: bytes) -> None:
    key = dep.secret
    for text in texts:
        for bit in (key[:16], key.hex()[:24].encode(), base64.b64encode(key)[:24]):
            assert bit not in text


# --------------------------------------------------------------------------- the attacks


def test_a_user_on_the_node_never_gets_the_secrets_root_during_boot_does_once(dep):
    dep.open_window("sn01")
    bind, [(status, script)] = as_user(dep, f"/ipxe?mac={mac(1, 3)}")
    assert bind == "PermissionError"  # a user cannot send from a privileged port
    args = script_of(script)  # the user knows the script, the token, the secrets URL
    assert args["provisioner.node"] == "sn01" and "provisioner.secrets" in args
    # before the callback, with the token: refused (its source port is not privileged)
    _, [(status, body)] = as_user(dep, secrets_path(args))
    assert status == 403 and b"source port" in body
    assert_no_secret(dep, script, body)
    # root on the node during its boot (the image's /init): once
    status, body = as_root(dep, secrets_path(args))
    assert status == 200, body
    archive = unpack(body)
    assert dep.secret in archive and b"provisioner/overlay/etc/provisioner/node-secret" in archive
    status, body = as_root(dep, secrets_path(args))
    assert status == 403 and b"served once" in body
    # the callback spends the token: the one in /proc/cmdline opens nothing afterwards
    assert callback(dep, "sn01", args["provisioner.token"]) == 200
    assert callback(dep, "sn01", args["provisioner.token"]) == 403
    assert as_root(dep, secrets_path(args))[0] == 403
    _, answers = as_user(dep, secrets_path(args), f"/ipxe?mac={mac(1, 3)}")
    assert answers[0][0] == 403
    # a new script (a new token) while the window is still open: served once already
    fresh = script_of(answers[1][1])
    assert fresh["provisioner.token"] != args["provisioner.token"]
    status, body = as_root(dep, secrets_path(fresh))
    assert status == 403 and b"served once" in body
    assert_no_secret(dep, *(b for _, b in answers), body)


def test_no_secret_outside_a_boot_window_even_for_root(dep):
    """A node that boots on its own (nobody asked for the boot) gets no secret: an event says why."""
    args = script_of(get(dep, f"/ipxe?mac={mac(3, 3)}")[1])
    status, body = as_root(dep, secrets_path(args))
    assert status == 403 and b"not being booted now" in body and b"provisioner power sn03" in body
    assert any("not being booted now" in e.message for e in dep.store.events(["sn03"], kinds=["secrets-refused"]))


def test_another_node_cannot_with_or_without_the_source_check(dep):
    dep.open_window("sn02")
    dep.open_window("sn03")
    # sn02 has an address (10.0.3.2): this host is another node, even as root
    args = script_of(get(dep, f"/ipxe?mac={mac(2, 3)}")[1])
    status, body = as_root(dep, secrets_path(args))
    assert status == 403 and b"is not the node's address 10.0.3.2" in body
    # sn03 has none (as with check_callback_source off): a user of another node still cannot
    args = script_of(get(dep, f"/ipxe?mac={mac(3, 3)}")[1])
    _, [(status, body)] = as_user(dep, secrets_path(args))
    assert status == 403 and b"source port" in body
    # nor with another node's token, or a made-up one, as root
    other = script_of(get(dep, f"/ipxe?mac={mac(2, 3)}")[1])["provisioner.token"]
    for token in (other, "0" * 32, ""):
        status, body = as_root(dep, secrets_path(args, token) if token else secrets_path(args).split("?")[0])
        assert status == 403 and b"not the token of this boot" in body, body
    assert_no_secret(dep, body)
    # a switch in `booting` opens the window too (the balancer's power action)
    dep.store.update("sn03", actor="test", kind="test", message="booting", phase="booting", phase_since=time.time(),
                     power_at=time.time())
    dep.settled("sn03")
    args = script_of(get(dep, f"/ipxe?mac={mac(3, 3)}")[1])
    status, body = as_root(dep, secrets_path(args))
    assert status == 200 and dep.secret in unpack(body), body
    dep.store.update("sn03", actor="test", kind="test", message="steady", phase="steady")


def test_the_images_init_fetches_the_secret_part_as_root_once(dep, tmp_path):
    """The image's own fetcher (fetch_secrets() of images/_common/init.sh, under busybox sh as in
    the initramfs): curl from a privileged port, the base64 body unpacked into /provisioner."""
    from testbed.tinyimage import DEFINITIONS

    busybox = shutil.which("busybox")
    if busybox is None:
        missing("busybox (Debian busybox; make system-deps)")
    init = (DEFINITIONS / "_common" / "init.sh").read_text()
    start = init.index("fetch_secrets() {")
    function = init[start:init.index("\n}\n", start) + 3]
    dep.open_window("sn01")
    args = script_of(get(dep, f"/ipxe?mac={mac(1, 3)}")[1])
    dest = tmp_path / "root"
    dest.mkdir()
    env = {"PATH": os.environ["PATH"], "SECRETS": args["provisioner.secrets"], "TOKEN": args["provisioner.token"],
           "VERSION": args["provisioner.version"], "PROVISIONER_TMP": str(tmp_path), "PROVISIONER_DEST": str(dest)}
    program = 'say() { echo "provisioner: $*"; }\n' + function + 'fetch_secrets\necho "RESULT=$SECRETS_OK"\n'
    for expected in ("yes", "refused"):
        r = subprocess.run([busybox, "sh", "-c", program], env=env, capture_output=True, text=True, timeout=120)
        assert f"RESULT={expected}" in r.stdout, r.stdout + r.stderr
    assert "served once" in r.stdout
    secret = dest / "provisioner" / "overlay" / "etc" / "provisioner" / "node-secret"
    assert secret.read_bytes() == dep.secret and stat.S_IMODE(secret.stat().st_mode) == 0o400
    assert stat.S_IMODE((dest / "provisioner").stat().st_mode) == 0o700
    assert not list(tmp_path.glob("secrets.*"))  # nothing left behind


FUZZ_REQUESTS = 300


def test_a_fuzz_of_raw_requests_finds_no_secret(dep):
    """Random MACs, tokens, paths and headers (a spoofed source port and address among them),
    while sn01 is in a boot window: no answer, log line, event or metric holds a secret or a
    token; no 5xx; /healthz and sn01's script are right afterwards."""
    rng = random.Random(24)
    dep.open_window("sn01")
    tokens: set[str] = set()
    real = script_of(get(dep, f"/ipxe?mac={mac(1, 3)}")[1])
    tokens.add(real["provisioner.token"])
    macs = [mac(1, 3), mac(2, 3), mac(3, 3), "52:54:00:99:99:99", "", "zz", "52-54-00-01-00-03", "%00", "${netX/mac}"]

    def token() -> str:
        return rng.choice([real["provisioner.token"], secrets.token_hex(16), "", "' OR 1=1 --", "%0d%0a", "a" * 300])

    def path() -> str:
        node = rng.choice(["sn01", "sn02", "sn03", "zz99", "..", "sn01%2f..", "%00"])
        return rng.choice([
            f"/ipxe?mac={rng.choice(macs)}", "/boot.ipxe", "/healthz", "/metrics",
            f"/overlay/{node}.cpio.gz?token={token()}&mac={rng.choice(macs)}&image=tiny",
            f"/overlay/{node}/secrets?token={token()}", f"/overlay/{node}/secrets?token={token()}&token={token()}",
            f"/api/v1/nodes/{node}/booted?token={token()}", f"/images/../{rng.choice(['site', 'files'])}/secret",
            "/images/%2e%2e/site/secret", f"/{secrets.token_hex(rng.randint(1, 40))}",
        ])

    answers = []
    for _ in range(FUZZ_REQUESTS):
        method = rng.choice(["GET", "GET", "GET", "POST", "HEAD", "PUT", "DELETE"])
        headers = {"Host": rng.choice(["x", "127.0.0.1", "evil\r\nX-Provisioner-Source-Port: 80"])}
        for name, value in (("X-Provisioner-Source-Port", rng.choice(["80", "700", "0", "-1", "x"])),
                            ("X-Forwarded-For", rng.choice(["127.0.0.1", "10.0.3.2", "::ffff:127.0.0.1", "a, b"])),
                            ("Authorization", f"Bearer {token()}"), ("Content-Type", "application/json"),
                            ("Range", "bytes=0-10")):
            if rng.random() < 0.4:
                headers[name] = value
        body = rng.choice([b"", json.dumps({"role": "slurm", "token": token()}).encode(), b"\xff" * 50,
                           f"role=k8s&token={token()}".encode()])
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"{method} {path()} HTTP/1.{rng.choice('01')}\r\n{head}Content-Length: {len(body)}\r\n" \
                  f"Connection: close\r\n\r\n".encode() + body
        status, answer = raw(dep.port, request)
        answers.append(answer)
        assert status is None or status < 500, (request, status, answer[:300])
        tokens.update(re.findall(r"provisioner\.token=([0-9a-f]+)", answer.decode(errors="replace")))
    assert_no_secret(dep, *answers)
    # nothing secret and no token in a log line, an event or a metric
    events = json.dumps([e.as_dict() for e in dep.store.events()])
    metrics = get(dep, "/metrics")[1].decode()
    for text in (dep.log_text(), events, metrics):
        assert_no_secret(dep, text.encode())
        for tok in tokens:
            assert tok not in text
        assert dep.site.secret_file.read_text().strip() not in text
    # still right afterwards
    status, body = get(dep, "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    args = script_of(get(dep, f"/ipxe?mac={mac(2, 3)}")[1])
    assert (args["provisioner.node"], args["provisioner.role"]) == ("sn02", "slurm")
    assert os.stat(dep.site.secret_file).st_mode & 0o077 == 0


def test_an_admin_host_minutes_ahead_of_the_boot_server_still_opens_the_window_once(dep):
    """The grant is stamped by the host `provisioner power` ran on, 5 minutes ahead here: the
    token the boot server issues for that boot is of the grant (the store's order), so root on
    the node gets its secrets once, and the user still nothing."""
    dep.store.grant_boot(["sn03"], actor="test", reason="test boot from a host ahead")
    with dep.store.transaction() as c:
        c.execute("UPDATE boots SET granted_at = granted_at + 300 WHERE node = ?", ("sn03",))
    dep.settled("sn03")
    args = script_of(as_root(dep, f"/ipxe?mac={mac(3, 3)}")[1])
    _, [(status, body)] = as_user(dep, secrets_path(args))
    assert status == 403 and b"source port" in body
    status, body = as_root(dep, secrets_path(args))
    assert status == 200, body
    assert dep.secret in unpack(body)
    assert as_root(dep, secrets_path(args))[0] == 403
    assert callback(dep, "sn03", args["provisioner.token"]) == 200


def test_a_nodes_kubelet_key_reaches_that_node_only_and_never_the_public_part(dep):
    """The kubelet client credentials provisioner keeps per node (kubelet_certs) go in the
    secret part of that node's overlay only: not in another node's, never in the public part."""
    from provisioner import kubelet_certs
    from tests.fakes import FakeKube

    for node in ("sn01", "sn03"):
        kubelet_certs.ensure(dep.site, FakeKube(), node)
    own, other = (kubelet_certs.current(dep.site, n) for n in ("sn01", "sn03"))
    dep.open_window("sn01")
    _, [(_, script)] = as_user(dep, f"/ipxe?mac={mac(1, 3)}")
    args = script_of(script)
    public_url = next(u for u in re.findall(r"initrd --name overlay (\S+)", script.decode()) if "/overlay/" in u)
    public_path = public_url[public_url.index("/overlay/"):].replace("${netX/mac}", mac(1, 3))
    _, [(status, public)] = as_user(dep, public_path)
    assert status == 200, public
    status, body = as_root(dep, secrets_path(args))
    assert status == 200, body
    archive = unpack(body)
    assert own.key in archive and own.certificate in archive
    assert b"provisioner/overlay/etc/provisioner/kubelet-client.pem" in archive
    public = gzip.decompress(public)
    for key in (own.key, other.key):
        assert key not in public and key.split(b"\n")[1] not in public
    assert other.key.split(b"\n")[1] not in archive and other.certificate not in archive
