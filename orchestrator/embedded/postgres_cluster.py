"""A private PostgreSQL cluster on a free loopback port, from the machine's own ``initdb``/``pg_ctl``.

For tests and the chaos benchmark, which must stop and restart "the database" without touching
any PostgreSQL the machine runs for others. PostgreSQL refuses to run as root, so as root the
cluster runs as the ``postgres`` system user (``runuser``), in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .ports import LOOPBACK, free_port
from .process import ProcessStartError
from .redis_server import ServerNotFoundError


def find_pg_bin() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (``$FLEET_PG_BIN``, PATH, Debian)."""
    override = os.environ.get("FLEET_PG_BIN")
    candidates = [override] if override else []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise ServerNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl) found; set FLEET_PG_BIN")


class PostgresCluster:
    """``initdb`` once, then :meth:`start` / :meth:`stop` (a real outage) / :meth:`restart` at will."""

    def __init__(self, *, base_dir: Path | None = None, port: int | None = None) -> None:
        self.bin = find_pg_bin()
        self.port = port or free_port()
        self.base_dir = Path(tempfile.mkdtemp(prefix="fleet-pg-", dir=base_dir))
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServerNotFoundError("running as root needs a 'postgres' system user") from exc
            os.chown(self.base_dir, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        initdb = [str(self.bin / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres"]
        self._run([*initdb, "-E", "UTF8"])

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database (psycopg 3)."""
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        result = subprocess.run(
            [*self._as, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.base_dir,
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise ProcessStartError(f"{' '.join(argv[:2])} failed: {output}")

    def start(self, timeout: float = 30) -> PostgresCluster:
        options = f"-p {self.port} -k {self.base_dir} -c listen_addresses={LOOPBACK} -c fsync=off"
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options]
        self._run([*argv, "-w", "-t", str(int(timeout)), "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: close connections; ``immediate``: like a crash)."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its URL."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
