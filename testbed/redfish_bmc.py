"""sushy-tools' Redfish emulator (`sushy-emulator`, PyPI) as the test world's Redfish BMC: HTTPS
on 127.0.0.1 with a certificate from a throw-away CA, HTTP basic auth from an htpasswd file
(bcrypt), and either its fake driver (systems that exist only in the emulator; a power change
shows after 1 to 11 s, as on a slow BMC) or its libvirt driver (each libvirt domain a system:
testbed/libvirt_host.py).

    bmc = RedfishBmc(workdir, fake=["rf01", "rf02"]).start()     # or libvirt_uri="qemu:///system"
    bmc.port, bmc.ca_file, bmc.password_file, bmc.system_power("rf01")
    bmc.stop(); bmc.start()                                      # a BMC that went away, and back

Stopped by pid (its process group), also when a test fails.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.request
import uuid
from pathlib import Path

from testbed.parts import PartMissing
from testbed.pki import CA
from testbed.process import Daemon, free_port, http_probe

USER = "admin"
PASSWORD = "rf-s3cret-Pw-9"  # distinctive: the tests search every output for it


def emulator_binary() -> str:
    exe = Path(sys.executable).with_name("sushy-emulator")
    if not exe.is_file():
        raise PartMissing("sushy-emulator is not installed; run `make venv` (sushy-tools is in the test extra)")
    return str(exe)


class RedfishBmc:
    def __init__(self, workdir: str | Path, *, fake: list[str] | None = None, libvirt_uri: str | None = None,
                 user: str = USER, password: str = PASSWORD):
        if (fake is None) == (libvirt_uri is None):
            raise ValueError("give either fake= (system names) or libvirt_uri=")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fake, self.libvirt_uri = fake, libvirt_uri
        self.user, self.password = user, password
        self.port = free_port()
        self.daemon: Daemon | None = None
        self.ca = CA.create(self.workdir / "pki", "provisioner-test-bmc-ca")
        self.cert, self.key = self.ca.issue("bmc", "127.0.0.1", server_names=("127.0.0.1",), client=False)
        self.ca_file = self.ca.cert
        self.password_file = self.workdir / "bmc-password"
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        self._write_config()

    def _write_config(self) -> None:
        import bcrypt

        htpasswd = self.workdir / "htpasswd"
        htpasswd.write_text(f"{self.user}:{bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(4)).decode()}\n")
        conf = {
            "SUSHY_EMULATOR_LISTEN_IP": "127.0.0.1",
            "SUSHY_EMULATOR_LISTEN_PORT": self.port,
            "SUSHY_EMULATOR_SSL_CERT": str(self.cert),
            "SUSHY_EMULATOR_SSL_KEY": str(self.key),
            "SUSHY_EMULATOR_AUTH_FILE": str(htpasswd),
            # the fake systems' power, kept across a restart of the emulator (as a BMC's is)
            "SUSHY_EMULATOR_STATE_DIR": str(self.workdir / "state"),
        }
        if self.fake is not None:
            conf["SUSHY_EMULATOR_FAKE_DRIVER"] = True
            conf["SUSHY_EMULATOR_FAKE_SYSTEMS"] = [
                {"uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{n}.provisioner.test")), "name": n,
                 "power_state": "Off", "nics": [{"mac": f"52:54:00:0f:00:{i:02x}", "ip": "127.0.0.1"}]}
                for i, n in enumerate(self.fake, start=1)]
        else:
            conf["SUSHY_EMULATOR_LIBVIRT_URI"] = self.libvirt_uri
        # A Flask config file is Python: one assignment per line, values as Python literals.
        self.config = self.workdir / "emulator.conf"
        self.config.write_text("".join(f"{k} = {v!r}\n" for k, v in conf.items()))

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def start(self, timeout: float = 60) -> "RedfishBmc":
        self.daemon = Daemon([emulator_binary(), "--config", str(self.config)], self.port,
                             self.workdir / "sushy-emulator.log", name="sushy-emulator")
        self.daemon.start(self._ready, timeout)
        return self

    def _ready(self) -> bool:
        """The service root answers (it needs no login, nor the emulator's backend)."""
        return http_probe(f"https://127.0.0.1:{self.port}/redfish/v1/", self.context())()

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop()

    def running(self) -> bool:
        return bool(self.daemon and self.daemon.running())

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon else None

    # ----------------------------------------------------------------- a second client (urllib)

    def get(self, path: str) -> dict:
        """GET with the credentials, verified against the CA: the tests' own view of the BMC."""
        import base64

        req = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", headers={
            "Authorization": "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()})
        with urllib.request.urlopen(req, timeout=10, context=self.context()) as r:
            return json.loads(r.read())

    def system(self, name: str) -> dict:
        return self.get(f"/redfish/v1/Systems/{self.system_id(name)}")

    def system_id(self, name: str) -> str:
        """The emulator's id of system `name` (the fake driver's are UUIDs; libvirt's are names)."""
        for m in self.get("/redfish/v1/Systems")["Members"]:
            sid = m["@odata.id"].rsplit("/", 1)[-1]
            if sid == name or self.get(m["@odata.id"]).get("Name") == name:
                return sid
        raise KeyError(f"no Redfish system named {name}")

    def system_power(self, name: str) -> str:
        return self.system(name)["PowerState"].lower()
