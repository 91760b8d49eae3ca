"""A throw-away PostgreSQL server for tests: initdb into a temporary directory, start it on a free port,
create a database, and stop and delete everything at the end.

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` system user
(``runuser -u postgres --``) in a directory handed to that user. Binaries are looked up on PATH, then in
Debian's ``/usr/lib/postgresql/*/bin``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresServer", "find_binary", "MISSING_MESSAGE"]

MISSING_MESSAGE = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
    "install them with `apt-get install postgresql` (or set DST_SKIP_POSTGRES=1 to skip these tests)"
)


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """``with PostgresServer() as url:`` a running server's ``postgresql://postgres@127.0.0.1:PORT/studies``."""

    def __init__(self, database: str = "studies", timeout: float = 60.0) -> None:
        self.database, self.timeout = database, timeout
        self.initdb, self.pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        self.directory: Path | None = None
        self.port = 0
        self.started = False

    @property
    def available(self) -> bool:
        return bool(self.initdb and self.pg_ctl)

    def _as_owner(self, *command: str) -> list[str]:
        if os.geteuid() == 0:  # the server must not run as root
            runner = shutil.which("runuser")
            return [runner, "-u", "postgres", "--", *command] if runner else ["su", "postgres", "-c",
                                                                                " ".join(command)]
        return list(command)

    def _call(self, *command: str) -> None:
        result = subprocess.run(self._as_owner(*command), capture_output=True, text=True, timeout=self.timeout)
        if result.returncode:
            log = self.directory / "server.log" if self.directory else None
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")

    def start(self) -> str:
        if not self.available:
            raise RuntimeError(MISSING_MESSAGE)
        self.directory = Path(tempfile.mkdtemp(prefix="dst-postgres-"))
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self.port = _free_port()
        self._call(self.initdb, "-D", str(self.directory / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync")
        self.resume()
        createdb = find_binary("createdb") or str(Path(self.pg_ctl).with_name("createdb"))
        self._call(createdb, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def halt(self) -> None:
        """Stop the server at once (as a crash or a lost machine would), keeping its data for :meth:`resume`."""
        if self.started and self.directory is not None:
            self._call(self.pg_ctl, "-D", str(self.directory / "data"), "-m", "immediate", "-w", "stop")
        self.started = False

    def resume(self) -> None:
        """Start the server (again) on its port and data directory."""
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=50")
        self._call(self.pg_ctl, "-D", str(self.directory / "data"), "-o", options, "-l",
                   str(self.directory / "server.log"), "-w", "-t", str(int(self.timeout)), "start")
        self.started = True

    def stop(self) -> None:
        try:
            self.halt()
        finally:
            self.started = False
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
