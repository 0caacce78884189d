"""A throw-away PostgreSQL server for the tests: Debian's real postgres (package postgresql),
initdb into a private temporary folder, listening on 127.0.0.1:<free port> and on a socket in
that folder, stopped by pid (its process group) at the end.

postgres refuses to run as root: as root, the server runs as the `postgres` user (Debian's
package creates it) and the folder is handed to it. TCP connections need the password of the
superuser `provisioner` (written to `password_file`); the socket trusts local users.

    pg = PostgresServer(Path("/tmp/x")).start()
    url = pg.create_database("t1")          # postgresql://provisioner@127.0.0.1:PORT/t1
    ... Store(url, password_file=pg.password_file) ...
    pg.pause(); pg.resume()                 # a restart under its clients: same data, same port
    pg.crash(); pg.resume()                 # kill -9 and crash recovery
    pg.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from testbed.parts import PartMissing
from testbed.process import free_port, stop_group

SUPERUSER = "provisioner"
PASSWORD = "pg-test-pw"


def find_bin_dir() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/VERSION/bin), the newest version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    return Path(which).parent if which else None


class PostgresServer:
    def __init__(self, parent: Path | None = None):
        self.bin = find_bin_dir()
        self.parent = parent
        self.folder: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.user: str | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    # ----------------------------------------------------------------------- life cycle

    def _run_as(self) -> dict:
        """Popen arguments that run a command as the server's user (postgres when we are root)."""
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam(self.user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        if self.bin is None:
            raise PartMissing("postgres (Debian package postgresql) is not installed")
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PartMissing("no `postgres` user to run the server as (Debian package postgresql)") from None
            self.user = "postgres"
        # A folder of its own under /tmp (pytest's are 0700 root: the postgres user could not enter them).
        self.folder = Path(tempfile.mkdtemp(prefix="provisioner-pg-", dir=self.parent if self.user is None else None))
        self.folder.chmod(0o755)
        self.password_file.write_text(PASSWORD + "\n")
        self.password_file.chmod(0o644)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        init = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={self.password_file}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, env=env, cwd=self.folder, **self._run_as())
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:]}")
        self.port = free_port()
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "PostgresServer":
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.folder),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=self.folder,
                start_new_session=True, **self._run_as())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode} while starting: {self.tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not become ready within {timeout:.0f} s: {self.tail()}")

    def ready(self) -> bool:
        probe = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
        return probe.returncode == 0

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        """Fast shutdown (SIGINT: clients are disconnected) of the server's process group, by pid;
        then the folder goes."""
        stop_group(self.proc, signal.SIGINT, timeout)
        if self.folder and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)

    def pause(self, timeout: float = 20) -> None:
        """Stop the server (fast shutdown: its clients are disconnected) and keep its folder, data
        dir and port, for resume(): a database restart under its clients."""
        stop_group(self.proc, signal.SIGINT, timeout)

    def crash(self) -> None:
        """kill -9 the server and its backends (its process group), keeping its data dir and port:
        resume() starts it again, through crash recovery."""
        stop_group(self.proc, signal.SIGKILL, 10)

    def resume(self, timeout: float = 60.0) -> "PostgresServer":
        """Start the server paused by pause() again: same data dir, same port."""
        if self.proc and self.proc.poll() is None:
            return self
        return self._launch(timeout)

    # ----------------------------------------------------------------------- databases

    def connect(self, db: str = "postgres"):
        import psycopg

        return psycopg.connect(self.url(db), password=PASSWORD, autocommit=True)

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its URL (without the password)."""
        with self.connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def site_store(self, db: str, state_dir: Path) -> dict:
        """A fresh database `db`, as the site keys of a store on it (site.store and its password
        file; state_dir: where a host keeps its local files, its locks)."""
        return {"store": self.create_database(db), "store_password_file": str(self.password_file),
                "state_dir": str(state_dir)}

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
