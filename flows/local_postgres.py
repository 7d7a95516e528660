"""A PostgreSQL server of the local stack's own, for its Prefect server's database.

Prefect on SQLite serialises every write; a burst of task runs (a sweep) then stalls it with
"database is locked" and 503s. ``clusterflow local up`` therefore runs Debian's PostgreSQL:

- the binaries come from the ``postgresql`` package (installed with apt-get when missing and
  we are root, as ``make slurm`` installs Slurm);
- the cluster lives in ``<state dir>/stack/postgres`` (``initdb``), listens on 127.0.0.1 on a
  free port and puts its socket in its data dir, so it never meets the system's PostgreSQL;
- initdb and the server refuse to run as root, so as root they run as Debian's ``postgres``
  user (the data dir's parents get o+x, traverse only, where that user could not reach it);
- the role ``clusterflow`` gets a random password (``password`` in the data dir, 0600): TCP
  logins use scram-sha-256, so another local user cannot open the database.

Prefect reaches it through ``postgresql+asyncpg://`` (asyncpg comes with prefect).
``stop`` is a fast shutdown with ``pg_ctl``; the data dir stays for the next ``up``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_USER = "postgres"  # Debian's package creates it; the server runs as it when we are root
ROLE = "clusterflow"
DATABASE = "prefect"


class PostgresError(RuntimeError):
    """PostgreSQL cannot be installed, initialised, started or stopped; the message says why."""


def _bindirs() -> list[Path]:
    root = Path("/usr/lib/postgresql")
    dirs = [d / "bin" for d in root.glob("*") if (d / "bin" / "initdb").is_file()]
    return sorted(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
                  reverse=True)


def bindir(install: bool = True) -> Path:
    """Debian's newest PostgreSQL bin dir, installing ``postgresql`` when root and missing."""
    found = _bindirs()
    if found:
        return found[0]
    if not install or os.geteuid() != 0:
        raise PostgresError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                            "install Debian's postgresql package (apt-get install postgresql)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise PostgresError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    found = _bindirs()
    if not found:
        raise PostgresError("apt-get installed postgresql but no initdb was found")
    return found[0]


def _run_as() -> str | None:
    """The user the server runs as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise PostgresError(f"running as root needs the {PG_USER!r} user (Debian's "
                            "postgresql package creates it)") from None
    return PG_USER


def _reachable_by(path: Path, user: str) -> None:
    """Give ``user`` traverse rights (o+x) on root-owned parents that deny it."""
    uid = pwd.getpwnam(user).pw_uid
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid == os.geteuid():
            parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        else:
            raise PostgresError(f"the {user} user cannot reach {path}: {parent} is not "
                                "traversable; choose another CLUSTERFLOW_HOME")


@dataclass(frozen=True)
class LocalPostgres:
    """One PostgreSQL cluster under ``data_dir`` (created on first ``init``)."""

    data_dir: Path
    port: int

    @property
    def password_file(self) -> Path:
        return self.data_dir.parent / "postgres-password"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect's server uses (carries the password)."""
        pw = self.password_file.read_text().strip()
        return f"postgresql+asyncpg://{ROLE}:{pw}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def display_url(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _cmd(self, binary: str, *args: str) -> list[str]:
        return [str(bindir() / binary), *args]

    def _popen_user(self) -> dict[str, object]:
        user = _run_as()
        return {"user": user, "group": user} if user else {}

    def _run(self, argv: list[str], timeout: float = 120, password: bool = False,
             ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if password:
            env["PGPASSWORD"] = self.password_file.read_text().strip()
        return subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True,
                              timeout=timeout, **self._popen_user())  # type: ignore[arg-type]

    def init(self) -> None:
        """initdb once (a data dir with PG_VERSION is kept), then the ``prefect`` database."""
        if (self.data_dir / "PG_VERSION").is_file():
            return
        user = _run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.password_file.chmod(0o600)
        pwfile = self.data_dir.parent / ".initdb-pwfile"  # read by initdb, then removed
        pwfile.write_text(self.password_file.read_text())
        if user:
            _reachable_by(self.data_dir, user)
            uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
            os.chown(self.data_dir, uid, gid)
            os.chown(pwfile, uid, gid)
        try:
            proc = self._run(self._cmd("initdb", "-D", str(self.data_dir), "-U", ROLE,
                                       "--pwfile", str(pwfile), "--auth-host=scram-sha-256",
                                       "--auth-local=scram-sha-256", "-E", "UTF8",
                                       "--no-instructions"), timeout=300)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise PostgresError(f"initdb {self.data_dir} failed: {proc.stderr.strip()[-800:]}")

    def command(self) -> list[str]:
        """The server's argv (run in the foreground, so the stack records its pid)."""
        return self._cmd("postgres", "-D", str(self.data_dir), "-p", str(self.port),
                         "-k", str(self.data_dir), "-c", "listen_addresses=127.0.0.1",
                         # Prefect's server holds a pool per service; bursts need headroom.
                         "-c", "max_connections=200")

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
                self.command(), cwd="/", stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
                **self._popen_user())

    def ready(self) -> bool:
        proc = self._run(self._cmd("pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                                   "-U", ROLE, "-d", "postgres"), timeout=10)
        return proc.returncode == 0

    def ensure_database(self) -> None:
        psql = self._cmd("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE,
                         "-d", "postgres", "-tAc")
        got = self._run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                        password=True)
        if got.returncode != 0:
            raise PostgresError(f"psql on port {self.port} failed: {got.stderr.strip()}")
        if got.stdout.strip() != "1":
            made = self._run([*psql, f"CREATE DATABASE {DATABASE}"], password=True)
            if made.returncode != 0:
                raise PostgresError(f"CREATE DATABASE {DATABASE} failed: "
                                    f"{made.stderr.strip()}")

    def wait_ready(self, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise PostgresError(f"postgres exited at start (code {proc.returncode}); "
                                    f"{log} ends with:\n{tail}")
            if time.monotonic() > deadline:
                raise PostgresError(f"postgres was not ready within {timeout:.0f} s; see {log}")
            time.sleep(0.2)
        self.ensure_database()

    def stop(self, timeout: float = 60) -> bool:
        """Fast shutdown (rolls back open transactions); False if it was not running."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        proc = self._run(self._cmd("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast",
                                   "-w", "-t", str(int(timeout))), timeout=timeout + 10)
        return proc.returncode == 0

    def remove(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.password_file.unlink(missing_ok=True)
