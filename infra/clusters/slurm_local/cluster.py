"""The local Slurm's lifecycle: its own munged, slurmctld and slurmd, up, down and status.

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

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from infra.clusters.slurm_local.config import (
    load_settings,
    node_line,
    render,
    render_mpi,
    save_settings,
)
from infra.clusters.slurm_local.install import install, missing_commands, missing_packages
from infra.clusters.slurm_local.layout import (
    DAEMONS,
    INSTALL_HINT,
    PACKAGES,
    PARTITION,
    USABLE_NODE_STATES,
    Layout,
    LocalSlurmError,
    Settings,
    console,
    default_state_dir,
    slurm_env,
)
from infra.clusters.slurm_local.processes import (
    _alive,
    _orphans,
    _ours,
    _pick_ports,
    _port_free,
    _run,
    _tail,
)


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
        return load_settings(self.layout, self._state_save)

    def _save_settings(self, s: Settings) -> None:
        save_settings(self.layout, s)

    def node_line(self) -> str:
        """``slurmd -C``: this machine's real CPUs, sockets and memory, as a NodeName line."""
        return node_line()

    def render(self, s: Settings) -> str:
        return render(self.layout, s, self.node_line())

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

        conf, mpi = self.render(s), render_mpi(lay)
        changed = any(not path.exists() or path.read_text() != text
                      for path, text in ((lay.conf, conf), (lay.mpi_conf, mpi)))
        done: dict[str, Any] = {"started": [], "restarted": [], "config_changed": changed,
                                "ports_moved_from": moved}
        if self.pid("slurmd") is None:
            # No step of this cluster can be using it: start from an empty one, so a job id
            # reused after a wiped controller state cannot meet an old step's directory.
            shutil.rmtree(lay.pmix_tmp, ignore_errors=True)
        lay.pmix_tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        if changed:
            lay.conf.write_text(conf)
            lay.mpi_conf.write_text(mpi)
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
        if self.pid("slurmd") is None:
            shutil.rmtree(self.layout.pmix_tmp, ignore_errors=True)
            if not self.layout.slurmd_spool.is_relative_to(self.layout.root):
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
