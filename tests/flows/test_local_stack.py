"""``clusterflow local up|status|down``: what ``up`` starts, ``down`` stops, and nothing else.

One stack for the whole module (a fresh Prefect server costs ~15-20 s to migrate its
database). ``up`` runs with SIGINT ignored, as it is under ``cmd &`` from a script, which
is where Prefect's worker used to ignore SIGTERM too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import BIN, REPO


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PREFECT_", "CLUSTERFLOW_"))}
    env["CLUSTERFLOW_HOME"] = str(home)
    return env


def _cli(args: list[str], env: dict[str, str], ignore_sigint: bool = False,
         ) -> subprocess.CompletedProcess[str]:
    def background() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.run([str(BIN / "clusterflow"), *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=240,
                          preexec_fn=background if ignore_sigint else None)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _prefect_tables(home: Path, url: str) -> int:
    """How many tables the stack's PostgreSQL holds in its ``prefect`` database."""
    from flows.local_postgres import LocalPostgres

    pg = LocalPostgres(home / "stack" / "postgres" / "data", int(url.rsplit(":", 1)[1]
                                                                 .split("/")[0]))
    psql = pg._cmd("psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "clusterflow",
                   "-d", "prefect", "-tAc",
                   "SELECT count(*) FROM information_schema.tables "
                   "WHERE table_schema = 'public'")
    got = pg._run(psql, password=True)
    assert got.returncode == 0, got.stderr
    return int(got.stdout.strip())


def test_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home)
    proc = _cli(["local", "up", "--json"], env, ignore_sigint=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["started"] is True and report["state"] == "running"
    comps = report["components"]
    assert set(comps) == {"moto", "postgres", "prefect-server", "worker", "consumers",
                          "runner"}
    pids = {name: c["pid"] for name, c in comps.items()}
    try:
        assert all(c["running"] for c in comps.values())
        assert comps["prefect-server"]["healthy"] and comps["moto"]["healthy"]
        assert comps["postgres"]["healthy"] and comps["runner"]["healthy"]
        # The warm runner answers on its socket (flows.warm_runner).
        from flows.warm_runner import ping

        assert ping(home)["pid"] == pids["runner"]
        assert report["database"] == comps["postgres"]["url"]
        assert report["database"].startswith("postgresql://clusterflow@127.0.0.1:")
        # The Prefect server keeps its state in that PostgreSQL, not in SQLite.
        assert _prefect_tables(home, comps["postgres"]["url"]) > 20
        assert not list((home / "stack" / "prefect").glob("*.db"))
        assert all(_alive(pid) for pid in pids.values())
        # Each component leads its own session, so a signal reaches its whole group.
        assert all(os.getsid(pid) == pid for pid in pids.values())
        bridge = "event_bridge.prefect_bridge:handler"
        assert {f"input-uploads -> {bridge}", f"result-events -> {bridge}"} <= set(
            report["consumers"])

        # The moto server is recorded where every other command looks for it.
        recorded = json.loads((home / "moto.json").read_text())
        assert recorded == {"url": comps["moto"]["url"], "pid": pids["moto"]}
        probe = subprocess.run(
            [sys.executable, "-c", "from infra.aws.embedded import recorded_server as r; "
             "print(r())"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == comps["moto"]["url"], probe.stderr

        # `up` again is a no-op on the running stack.
        again = _cli(["local", "up", "--json"], env)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["started"] is False
        assert {n: c["pid"] for n, c in json.loads(again.stdout)["components"].items()} == pids

        status = _cli(["local", "status", "--json"], env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["components"] == comps
        human = _cli(["local", "status"], env)
        assert human.returncode == 0 and "running" in human.stdout
        assert f"database  {report['database']}" in human.stdout

        # Everything up started, down to grandchildren, must go.
        every = set().union(*(_tree(pid) for pid in pids.values()))
    finally:
        down = _cli(["local", "down", "--json"], env)
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout)
    assert stopped["stopped"] == {n: pids[n] for n in ("runner", "consumers", "worker",
                                                        "prefect-server", "moto", "postgres")}
    assert stopped["pids_killed"] == []  # every process honoured SIGTERM
    assert set(stopped["pids_signalled"]) >= set(pids.values())
    left = sorted(pid for pid in every if _alive(pid))
    assert left == [], f"processes left behind: {left}"
    assert not (home / "moto.json").exists() and not (home / "local-stack.json").exists()
    assert not (home / "runner.sock").exists()
    data_dir = str(home / "stack" / "postgres" / "data")
    assert not [p.pid for p in psutil.process_iter(["cmdline"])
                if data_dir in " ".join(p.info["cmdline"] or [])], "a postgres is left"

    after = _cli(["local", "status", "--json"], env)
    assert after.returncode == 3
    assert json.loads(after.stdout)["state"] == "stopped"
    assert json.loads(_cli(["local", "down", "--json"], env).stdout)["was_running"] is False


def test_partial_stack_is_reported_and_refused(tmp_path: Path) -> None:
    """A stack whose consumer died: status says degraded, up refuses, down cleans up."""
    from flows.local_stack import Component, StackState, _save

    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               start_new_session=True)
    try:
        live = Component(name="moto", pid=sleeper.pid,
                         create_time=psutil.Process(sleeper.pid).create_time(),
                         command=["sleep"], log=str(home / "x.log"))
        # A recycled pid: same number as the sleeper's, different start time. Never signalled.
        recycled = live.model_copy(update={"name": "worker", "create_time": 1.0})
        _save(StackState(home=str(home), started_at="t", spec="s", work_pool="p",
                         components={"moto": live, "worker": recycled}))
        status = _cli(["local", "status", "--json"], env)
        assert status.returncode == 1, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["state"] == "degraded"
        assert report["components"]["moto"]["running"] is True
        assert report["components"]["worker"]["running"] is False

        up = _cli(["local", "up"], env)
        assert up.returncode == 1 and "local down" in up.stderr

        down = _cli(["local", "down", "--json"], env)
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["stopped"] == {"moto": sleeper.pid}
        assert json.loads(down.stdout)["pids_signalled"] == [sleeper.pid]
        assert sleeper.wait(timeout=20) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
