"""A real single-node Slurm on this machine: its own munged, slurmctld and slurmd.

The slurm backend is tested against the real scheduler, not a stand-in, so ``make slurm``
(``python -m infra.clusters.slurm_local up``) brings one up from Debian's packages (Slurm 22.05):

- as root it installs what is missing (``apt-get install slurmctld slurmd slurm-client munge
  libpmix-dev``; ``libpmix-dev`` because ``srun --mpi=pmix`` loads the unversioned
  ``libpmix.so`` only that package ships);
- everything it writes lives in one state dir (``$CLUSTERFLOW_HOME/slurm`` by default): the
  config, the munge key and a private munged socket, spool, logs, pid files and the
  controller's ``StateSaveLocation`` (movable, e.g. onto a shared volume for a head-node
  failover drill). Nothing under ``/etc`` or ``/run`` is touched, so it coexists with a system
  Slurm and with other instances in other state dirs (each gets its own ports);
- it is idempotent: ``up`` with everything running checks and returns; a dead daemon is
  restarted; a changed config (new StateSaveLocation, more memory) restarts the daemons;
- ``down`` stops only the daemons whose pid files it wrote (and cancels the jobs first, so no
  rank outlives its scheduler).

Clients reach it through ``SLURM_CONF`` (see `slurm_env`); every Slurm command honours it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.markup import escape

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix-dev")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sacct", "sinfo",
            "srun", "munged", "mungekey", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "local"
CLUSTER_NAME = "clusterflow"
DEFAULT_PORTS = (6817, 6818)  # Slurm's own defaults, used when free
# Node states in which the node is usable; anything else (down, drain, fail, "*" = not
# responding) means it is not, yet or at all.
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
INSTALL_HINT = ("apt-get install -y --no-install-recommends " + " ".join(PACKAGES))

console = Console(stderr=True, highlight=False)


class LocalSlurmError(RuntimeError):
    """The local Slurm cannot be installed, started or reached; the message says what to do."""


def default_state_dir() -> Path:
    # The rule of infra.aws.embedded.state_dir(), not imported from there: that module pulls
    # in boto3, which `make slurm` does not need.
    return Path(os.environ.get("CLUSTERFLOW_HOME", ".clusterflow")).resolve() / "slurm"


def slurm_env(state_dir: Path | str | None = None) -> dict[str, str]:
    """The environment additions that point Slurm's commands at the local cluster.

    Only the additions: merge them over ``os.environ`` (``{**os.environ, **slurm_env()}``).
    """
    root = Path(state_dir) if state_dir is not None else default_state_dir()
    return {"SLURM_CONF": str(root.resolve() / "slurm.conf")}


class Settings(BaseModel):
    """What must stay stable across ``up`` calls: recorded in ``<state dir>/cluster.json``."""

    model_config = ConfigDict(extra="forbid")

    ctld_port: int
    slurmd_port: int
    state_save_location: Path
    user: str


@dataclass(frozen=True)
class Layout:
    """Every path the local cluster uses, all below one state dir."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def settings(self) -> Path:
        return self.root / "cluster.json"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket_dir(self) -> Path:
        """Outside the state dir on purpose: munged refuses a socket below any directory that
        is not executable by all (a 0700 home, pytest's tmp dirs), and a socket path must fit
        in 108 bytes. One per user and state dir, so instances never share a munged."""
        tag = f"{zlib.crc32(str(self.root).encode()):08x}"
        return Path("/tmp") / f"clusterflow-munge-{os.geteuid()}-{tag}"

    @property
    def munge_socket(self) -> Path:
        return self.munge_socket_dir / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def slurmd_spool(self) -> Path:
        """slurmstepd binds Unix sockets here (``<node>_<job>.<step>``, ~25 bytes) and a socket
        path must fit in 108 bytes: a deep state dir (a CI checkout) gets a short one in /tmp,
        named like the munge socket dir."""
        spool = self.spool / "slurmd"
        if len(str(spool)) <= 70:
            return spool
        tag = f"{zlib.crc32(str(self.root).encode()):08x}"
        return Path("/tmp") / f"clusterflow-slurmd-{os.geteuid()}-{tag}"

    @property
    def jobcomp(self) -> Path:
        return self.log_dir / "jobcomp.log"

    @property
    def default_state_save(self) -> Path:
        return self.root / "ctld-state"

    def pid_file(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.log_dir / f"{daemon}.log"

    def marker(self, daemon: str) -> str:
        """A string in the daemon's command line that says it is ours, not another Slurm's."""
        return str(self.munge_key if daemon == "munged" else self.conf)


# --------------------------------------------------------------------------- processes


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 30,
         check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LocalSlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _alive(pid: int) -> bool:
    try:
        # A daemon reparented to a PID 1 that does not reap leaves a zombie behind: that is dead.
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _is_ours(proc: psutil.Process, daemon: str, marker: str) -> bool:
    try:
        return (proc.name() == daemon and marker in " ".join(proc.cmdline())
                and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))
    except psutil.Error:
        return False


def _ours(pid: int, daemon: str, marker: str) -> bool:
    try:
        return _is_ours(psutil.Process(pid), daemon, marker)
    except psutil.Error:
        return False


def _orphans(daemon: str, marker: str, known: int | None) -> list[int]:
    """Our daemon's processes that its pid file does not name (a lost or stale pid file)."""
    return [proc.pid for proc in psutil.process_iter()
            if proc.pid != known and _is_ours(proc, daemon, marker)]


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pick_ports(root: Path) -> tuple[int, int]:
    """Slurm's defaults when free; else a pair derived from the state dir, so two instances
    created while neither runs still get different ports."""
    if all(_port_free(p) for p in DEFAULT_PORTS):
        return DEFAULT_PORTS
    base = 20000 + (zlib.crc32(str(root).encode()) % 4000) * 2
    for offset in range(0, 4000, 2):
        ctld = 20000 + (base - 20000 + offset) % 8000
        if _port_free(ctld) and _port_free(ctld + 1):
            return ctld, ctld + 1
    raise LocalSlurmError("no two free TCP ports between 20000 and 28000 for slurmctld/slurmd")


# --------------------------------------------------------------------------- installation


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return []
    missing = []
    for pkg in PACKAGES:
        proc = _run(["dpkg-query", "-W", "-f", "${Status}", pkg])
        if proc.returncode != 0 or not proc.stdout.endswith(" installed"):
            missing.append(pkg)
    return missing


def _apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    return _run(["apt-get", *args], env=env, timeout=900)


def install(packages: Iterable[str]) -> None:
    """Install Debian's Slurm and munge; ``apt-get update`` once, only if apt needs it."""
    packages = list(packages)
    if not packages:
        return
    if os.geteuid() != 0:
        raise LocalSlurmError(
            f"Slurm is not installed ({', '.join(packages)} missing) and installing it needs "
            f"root: run `sudo {INSTALL_HINT}` (or `sudo make slurm`), then `make slurm` again")
    if shutil.which("apt-get") is None:
        raise LocalSlurmError(
            "Slurm is not installed and this is not a Debian-like system (no apt-get): install "
            "Slurm (slurmctld, slurmd, client commands) and munge with your package manager")
    console.print(f"installing {' '.join(packages)} (apt-get) ...")
    t0 = time.monotonic()
    updated = False
    policy = _run(["apt-cache", "policy", *packages])
    if "Candidate: (none)" in policy.stdout or policy.stdout.count("Candidate:") < len(packages):
        _apt(["update", "-q"])
        updated = True
    install_cmd = ["install", "-y", "-q", "--no-install-recommends", *packages]
    proc = _apt(install_cmd)
    if proc.returncode != 0 and not updated:  # stale package lists: refresh once, try again
        _apt(["update", "-q"])
        proc = _apt(install_cmd)
    if proc.returncode != 0:
        raise LocalSlurmError(f"`apt-get {' '.join(install_cmd)}` failed:\n"
                              f"{(proc.stderr or proc.stdout)[-2000:]}")
    console.print(f"installed in {time.monotonic() - t0:.0f} s")


# --------------------------------------------------------------------------- the cluster


class LocalSlurm:
    """One single-node cluster in ``state_dir``; see the module docstring."""

    def __init__(self, state_dir: Path | str | None = None,
                 state_save_location: Path | str | None = None) -> None:
        self.layout = Layout(Path(state_dir or default_state_dir()).resolve())
        self._state_save = Path(state_save_location).resolve() if state_save_location else None

    # ---- configuration

    def env(self) -> dict[str, str]:
        return slurm_env(self.layout.root)

    def settings(self) -> Settings:
        """The recorded settings, created on first use; a new StateSaveLocation is recorded."""
        lay = self.layout
        try:
            current = Settings.model_validate_json(lay.settings.read_text())
        except (OSError, ValueError):
            ctld, slurmd = _pick_ports(lay.root)
            current = Settings(ctld_port=ctld, slurmd_port=slurmd,
                               state_save_location=lay.default_state_save,
                               user=pwd.getpwuid(os.geteuid()).pw_name)
        if self._state_save and self._state_save != current.state_save_location:
            current = current.model_copy(update={"state_save_location": self._state_save})
        return current

    def _save_settings(self, s: Settings) -> None:
        self.layout.settings.write_text(s.model_dump_json(indent=2) + "\n")

    def node_line(self) -> str:
        """``slurmd -C``: this machine's real CPUs, sockets and memory, as a NodeName line."""
        proc = _run(["slurmd", "-C"], check=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NodeName=")), None)
        if line is None:
            raise LocalSlurmError(f"`slurmd -C` printed no NodeName line: {proc.stdout!r}")
        return line.strip()

    def render(self, s: Settings) -> str:
        lay = self.layout
        host = socket.gethostname().split(".")[0]
        lines = [
            "# Written by clusterflow (python -m infra.clusters.slurm_local up); "
            "rewritten on every up.",
            f"ClusterName={CLUSTER_NAME}",
            # Explicit loopback addresses: a fresh container's hostname may not resolve.
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={s.ctld_port}",
            f"SlurmdPort={s.slurmd_port}",
            f"SlurmUser={s.user}",
            f"SlurmdUser={s.user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={lay.munge_socket}",
            f"StateSaveLocation={s.state_save_location}",
            f"SlurmdSpoolDir={lay.slurmd_spool}",
            f"SlurmctldPidFile={lay.pid_file('slurmctld')}",
            f"SlurmdPidFile={lay.pid_file('slurmd')}",
            f"SlurmctldLogFile={lay.log_file('slurmctld')}",
            f"SlurmdLogFile={lay.log_file('slurmd')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Allocate at submit instead of waiting for the next scheduling pass (up to 3 s).
            "SchedulerParameters=batch_sched_delay=0",
            # Keep finished jobs in the controller for an hour (default 300 s), so status
            # polls can always see how a job ended.
            "MinJobAge=3600",
            "KillWait=10",
            # Refuse at submit what can never run (too many CPUs, a missing partition) instead
            # of leaving it pending forever with Reason=PartitionConfig.
            "EnforcePartLimits=ALL",
            "ReturnToService=2",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            # `sacct -c` reads this when the controller has forgotten a job.
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={lay.jobcomp}",
            f"{self.node_line()} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    # ---- daemons

    def pid(self, daemon: str) -> int | None:
        """The daemon's pid if it runs and is ours (pid file + command line), else None."""
        try:
            pid = int(self.layout.pid_file(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _ours(pid, daemon, self.layout.marker(daemon)) else None

    def _start_command(self, daemon: str) -> list[str]:
        lay = self.layout
        if daemon == "munged":
            return ["munged", "-S", str(lay.munge_socket), "--key-file", str(lay.munge_key),
                    "--pid-file", str(lay.pid_file("munged")),
                    "--log-file", str(lay.log_file("munged")),
                    "--seed-file", str(lay.munge_dir / "munged.seed")]
        return [daemon, "-f", str(lay.conf)]

    def start_daemon(self, daemon: str, timeout: float = 20) -> int:
        """Start one daemon (each backgrounds itself) and return its pid once it has one."""
        lay = self.layout
        if daemon == "munged":
            for stale in (lay.munge_socket, Path(f"{lay.munge_socket}.lock")):
                stale.unlink(missing_ok=True)
        lay.pid_file(daemon).unlink(missing_ok=True)
        start_log = lay.log_dir / f"{daemon}.start.log"
        with start_log.open("w") as out:
            # Output to a file, not a pipe: the forked daemon would hold a pipe open.
            code = subprocess.call(self._start_command(daemon), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **self.env()}, start_new_session=True,
                                   timeout=timeout)
        deadline = time.monotonic() + timeout
        while code == 0 and time.monotonic() < deadline:
            pid = self.pid(daemon)
            if pid:
                return pid
            time.sleep(0.05)
        raise LocalSlurmError(
            f"{daemon} did not start (exit {code}):\n{_tail(start_log)}\n"
            f"--- {lay.log_file(daemon)}:\n{_tail(lay.log_file(daemon))}")

    def stop_daemon(self, daemon: str, timeout: float = 30) -> bool:
        """SIGTERM (then SIGKILL) the daemon if it is ours and runs; True if one was stopped."""
        pid = self.pid(daemon)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.05)
        return True

    # ---- readiness

    def munge_answers(self) -> bool:
        sock = str(self.layout.munge_socket)
        try:
            cred = _run(["munge", "-n", "-S", sock], timeout=5)
            if cred.returncode != 0:
                return False
            proc = subprocess.run(["unmunge", "-S", sock], input=cred.stdout, text=True,
                                  capture_output=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0

    def node_state(self) -> tuple[str, str] | None:
        """(node name, state) as sinfo reports it, or None if the controller does not answer."""
        try:
            proc = _run(["sinfo", "-h", "-N", "-o", "%N|%T|%E"], env=self.env(), timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0 or "|" not in proc.stdout:
            return None
        name, state, reason = proc.stdout.splitlines()[0].split("|", 2)
        return name, state if reason in ("none", "") else f"{state} ({reason})"

    def _wait_usable(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        resumed = False
        last: tuple[str, str] | None = None
        while time.monotonic() < deadline:
            last = self.node_state()
            if last and last[1] in USABLE_NODE_STATES:
                return last
            if last and not resumed and last[1].split()[0].rstrip("*~#") in ("down", "drained"):
                # e.g. left "down" by a slurmd that died while the controller watched.
                _run(["scontrol", "update", f"NodeName={last[0]}", "State=RESUME"],
                     env=self.env())
                resumed = True
            time.sleep(0.1)
        lay = self.layout
        raise LocalSlurmError(
            f"the local Slurm node is not usable after {timeout:.0f} s "
            f"(sinfo: {last[1] if last else 'controller does not answer'}); logs:\n"
            f"--- {lay.log_file('slurmctld')}:\n{_tail(lay.log_file('slurmctld'))}\n"
            f"--- {lay.log_file('slurmd')}:\n{_tail(lay.log_file('slurmd'))}")

    # ---- lifecycle

    def up(self, *, install_missing: bool = True, timeout: float = 60) -> dict[str, Any]:
        """Make the cluster run; returns what was done (``{"started": [...], ...}``)."""
        missing = missing_packages()
        if missing and not missing_commands() and (os.geteuid() != 0 or not install_missing):
            # Slurm runs without them, but e.g. `srun --mpi=pmix` needs libpmix-dev.
            console.print(f"[yellow]warning:[/] {', '.join(missing)} not installed; "
                          f"`srun --mpi=pmix` may fail (fix: `sudo {INSTALL_HINT}`)")
            missing = []
        if missing_commands() or missing:
            if not install_missing:
                raise LocalSlurmError(f"Slurm commands missing ({', '.join(missing_commands())})"
                                      f": install them with `{INSTALL_HINT}`")
            install(missing or PACKAGES)
            if missing_commands():
                raise LocalSlurmError(
                    f"after installing, still missing: {', '.join(missing_commands())}")
        lay = self.layout
        s = self.settings()
        if s.user != pwd.getpwuid(os.geteuid()).pw_name:
            raise LocalSlurmError(
                f"the Slurm in {lay.root} was set up by {s.user!r}; run `up` as that user, or "
                f"`python -m infra.clusters.slurm_local down` as them and remove {lay.settings}")
        for d in (lay.root, lay.log_dir, lay.run_dir, lay.slurmd_spool,
                  s.state_save_location):
            d.mkdir(parents=True, exist_ok=True)
        lay.munge_dir.mkdir(mode=0o700, exist_ok=True)
        self._socket_dir()
        if not lay.munge_key.exists():
            _run(["mungekey", "-c", "-k", str(lay.munge_key)], check=True)
        lay.munge_key.chmod(0o600)
        moved = None
        held = [port for daemon, port in (("slurmctld", s.ctld_port), ("slurmd", s.slurmd_port))
                if self.pid(daemon) is None and not _port_free(port)]
        if held:
            # Ports are picked when a state dir is created; two dirs created while neither ran
            # (two checkouts, say) can hold the same pair. If another Slurm holds ours, move
            # both daemons to a free pair (the changed config restarts them; queued jobs are
            # kept) rather than fail with slurmd's "Address already in use". Unless it is our
            # own daemon whose pid file was lost: a second controller on the same state would
            # corrupt it.
            for daemon in ("slurmctld", "slurmd"):
                strays = _orphans(daemon, lay.marker(daemon), self.pid(daemon))
                if strays:
                    raise LocalSlurmError(
                        f"{daemon} of {lay.root} runs as pid {strays[0]} but {lay.pid_file(daemon)}"
                        f" does not name it; stop it (kill {strays[0]}) and run `up` again")
            moved = [s.ctld_port, s.slurmd_port]
            ctld, slurmd = _pick_ports(lay.root)
            s = s.model_copy(update={"ctld_port": ctld, "slurmd_port": slurmd})
            console.print(f"ports {moved[0]}/{moved[1]} are taken (another Slurm?); "
                          f"this one moves to {ctld}/{slurmd}")

        conf = self.render(s)
        changed = not lay.conf.exists() or lay.conf.read_text() != conf
        done: dict[str, Any] = {"started": [], "restarted": [], "config_changed": changed,
                                "ports_moved_from": moved}
        if changed:
            lay.conf.write_text(conf)
            self._save_settings(s)
            for daemon in ("slurmd", "slurmctld"):
                if self.stop_daemon(daemon):
                    done["restarted"].append(daemon)
        if self.pid("munged") and not self.munge_answers():
            self.stop_daemon("munged")  # alive but deaf (e.g. its socket was removed from /tmp)
        for daemon in DAEMONS:
            if self.pid(daemon) is None:
                self.start_daemon(daemon)
                if daemon not in done["restarted"]:
                    done["started"].append(daemon)
            if daemon == "munged":
                self._wait_munge(timeout)
        done["node"] = self._wait_usable(timeout)
        return done

    def _socket_dir(self) -> None:
        """Create the munge socket dir in /tmp, refusing one that someone else planted."""
        d = self.layout.munge_socket_dir
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            pass
        st = d.lstat()
        if not d.is_dir() or d.is_symlink() or st.st_uid != os.geteuid():
            raise LocalSlurmError(f"{d} exists but is not a directory owned by you; remove it")
        d.chmod(0o755)  # munged refuses a socket dir that others can write to

    def _wait_munge(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.munge_answers():
            if time.monotonic() > deadline:
                log = self.layout.log_file("munged")
                raise LocalSlurmError(f"munged does not answer on {self.layout.munge_socket}:"
                                      f"\n{_tail(log)}")
            time.sleep(0.05)

    def jobs(self) -> list[str]:
        """Ids of the jobs the controller still runs or queues."""
        proc = _run(["squeue", "-h", "-o", "%i"], env=self.env(), timeout=10)
        return proc.stdout.split() if proc.returncode == 0 else []

    def down(self, *, cancel_jobs: bool = True, timeout: float = 30) -> list[str]:
        """Cancel the jobs (so no rank outlives its slurmd), then stop our daemons."""
        if cancel_jobs and self.pid("slurmctld"):
            ids = self.jobs()
            if ids:
                _run(["scancel", *ids], env=self.env(), timeout=10)
                deadline = time.monotonic() + timeout
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
        stopped = [d for d in reversed(DAEMONS) if self.stop_daemon(d)]
        if self.pid("munged") is None:
            shutil.rmtree(self.layout.munge_socket_dir, ignore_errors=True)
        if self.pid("slurmd") is None and not self.layout.slurmd_spool.is_relative_to(
                self.layout.root):
            shutil.rmtree(self.layout.slurmd_spool, ignore_errors=True)
        return stopped

    def status(self) -> dict[str, Any]:
        daemons = {d: {"pid": self.pid(d), "running": self.pid(d) is not None} for d in DAEMONS}
        node = self.node_state() if daemons["slurmctld"]["running"] else None
        try:
            s: Settings | None = Settings.model_validate_json(self.layout.settings.read_text())
        except (OSError, ValueError):
            s = None
        return {
            "state_dir": str(self.layout.root),
            "slurm_conf": str(self.layout.conf),
            "configured": self.layout.conf.exists(),
            "up": all(d["running"] for d in daemons.values()) and bool(node)
            and node[1] in USABLE_NODE_STATES,
            "daemons": daemons,
            "node": {"name": node[0], "state": node[1]} if node else None,
            "partition": PARTITION,
            "ports": {"slurmctld": s.ctld_port, "slurmd": s.slurmd_port} if s else None,
            "state_save_location": str(s.state_save_location) if s else None,
            "user": s.user if s else None,
            "env": self.env(),
        }


# --------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A real single-node Slurm on this machine (for the slurm backend).")

StateDirOpt = Annotated[Path | None, typer.Option(
    "--state-dir", help="Where config, keys, spool, logs and state live.",
    show_default="$CLUSTERFLOW_HOME/slurm")]  # typer renders it; "[...]" in help is markup


@app.command()
def up(
    state_dir: StateDirOpt = None,
    state_save_location: Annotated[Path | None, typer.Option(
        help="slurmctld's StateSaveLocation (kept across ups once set).",
        show_default="<state dir>/ctld-state")] = None,
    install_missing: Annotated[bool, typer.Option(
        "--install/--no-install", help="apt-get install Slurm and munge when missing (root).",
    )] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the node.")] = 60,
) -> None:
    """Install (as root, when missing) and start Slurm; idempotent."""
    cluster = LocalSlurm(state_dir, state_save_location)
    t0 = time.monotonic()
    try:
        done = cluster.up(install_missing=install_missing, timeout=timeout)
    except LocalSlurmError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    name, state = done["node"]
    what = ("already running" if not (done["started"] or done["restarted"]) else
            ", ".join([f"started {d}" for d in done["started"]]
                      + [f"restarted {d}" for d in done["restarted"]]))
    console.print(f"[green]Slurm is up[/] ({what}; node {name} {state}, "
                  f"{time.monotonic() - t0:.1f} s)")
    console.print(f"use it with: export SLURM_CONF={cluster.layout.conf}")


@app.command()
def down(
    state_dir: StateDirOpt = None,
    keep_jobs: Annotated[bool, typer.Option(
        help="Do not cancel queued/running jobs first.")] = False,
) -> None:
    """Cancel the jobs, then stop the daemons `up` started (by their pid files)."""
    stopped = LocalSlurm(state_dir).down(cancel_jobs=not keep_jobs)
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(state_dir: StateDirOpt = None) -> None:
    """Print the cluster's state as JSON; exit 0 when it is up, 1 otherwise."""
    info = LocalSlurm(state_dir).status()
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
    raise typer.Exit(0 if info["up"] else 1)


if __name__ == "__main__":
    app()
