"""``clusterflow local up|down|status``: a long-lived local stack in the background.

``up`` starts, each in its own session (so a signal reaches the whole process group and a
worker started from a non-interactive shell still honours SIGTERM):

- a PostgreSQL server of its own (``flows.local_postgres``: Debian's package, data dir under
  the state dir, a free port) holding the Prefect server's database; SQLite stalls on bursts
  of task runs, and a single ``clusterflow run`` without a stack keeps SQLite;
- a Prefect server (``prefect server start``) with the services event-triggered and
  scheduled deployments need (triggers/actions, scheduler), on that database;
- the embedded AWS endpoint (moto + clusterflow's extensions), recorded in ``moto.json`` so
  every ``clusterflow`` command and flow run reuses it;
- a ``process`` work pool worker, which runs the deployments' flow runs;
- the event fabric (``event_bridge/fabric.yaml``: buckets, rules, topics, queues with DLQs,
  the dedup table), applied to that endpoint, and its background consumers
  (``clusterflow events consume``), among them the Prefect bridge
  (``event_bridge.prefect_bridge:handler``) on ``input-uploads`` and ``result-events``;
- the warm runner (``flows.warm_runner``): Prefect and the pipeline imported once, so each
  ``clusterflow run`` against the stack forks from it instead of importing them again.

Everything it starts is recorded in ``local-stack.json`` (pid and process start time, so a
recycled pid is never signalled), with logs under ``logs/``. ``down`` stops exactly those
processes and their descendants (flow runs, MPI ranks), SIGTERM first, SIGKILL after a grace
period.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import yaml
from pydantic import BaseModel

from event_bridge.fabric import DEFAULT_FABRIC, Fabric, FabricError, load_fabric
from flows import warm_runner
from flows.local_postgres import LocalPostgres, PostgresError
from flows.prefect_runtime import LOCAL_SERVER_DEFAULTS, STACK_STATE, stack_api
from flows.spec import DEFAULT_SPEC, load_spec
from flows.stack_processes import (
    Component,
    StackError,
    healthy,
    log_tail,
    recorded_process,
    spawn,
    stop_components,
    wait_for,
)
from infra.aws.clients import AwsTarget
from infra.aws.embedded import MotoServer, _free_port

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "prefect.yaml"
BIN = Path(sys.executable).parent
STATE_FILE = STACK_STATE
# ``down`` stops the clients (consumers, worker) before the services they talk to.
COMPONENTS = ("moto", "postgres", "prefect-server", "worker", "consumers", "runner")

# The stack's server runs deployments, so it needs the services a single CLI run does not:
# triggers (reactive and proactive automations, and the actions that start runs), the
# scheduler (cron), late runs and the foreman (worker/pool health). Events are persisted
# every second (default 5) so the events API shows what the bridge emitted at once.
STACK_SERVER_SETTINGS = {
    **LOCAL_SERVER_DEFAULTS,
    "PREFECT_SERVER_UI_ENABLED": "true",  # people look at the stack's runs in the UI
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}
# Workers poll for runs every 10 s by default; locally a run should start within ~2 s.
STACK_CLIENT_SETTINGS = {
    "PREFECT_WORKER_QUERY_SECONDS": "2",
    "PREFECT_LOGGING_LEVEL": "INFO",
}


class StackState(BaseModel):
    home: str
    started_at: str
    spec: str
    fabric: str = ""
    work_pool: str
    prefect_api_url: str | None = None
    moto_url: str | None = None
    database_port: int | None = None
    consumers: list[str] = []
    components: dict[str, Component] = {}


def default_work_pool() -> str:
    """The pool prefect.yaml's deployments name (the first one)."""
    doc = yaml.safe_load(PREFECT_FILE.read_text())
    for dep in doc.get("deployments", []):
        name = (dep.get("work_pool") or {}).get("name")
        if name:
            return str(name)
    raise StackError(f"{PREFECT_FILE} names no work pool")


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def load_state(home: Path) -> StackState | None:
    try:
        return StackState.model_validate_json(_state_path(home).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise StackError(f"{_state_path(home)} is unreadable ({e}); remove it if no stack "
                         "is running") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save(state: StackState) -> None:
    _write_json(_state_path(Path(state.home)), state.model_dump(mode="json"))


def recorded_prefect_api(home: Path) -> str | None:
    """The API URL of a running local stack's Prefect server, if it answers."""
    return stack_api(home)


# ---------------------------------------------------------------------------- fabric

def background_consumers(fabric: Fabric) -> list[str]:
    """What ``events consume`` runs: ``source -> handler`` for each background consumer."""
    return [f"{c.queue or c.topic} -> {c.handler}" for c in fabric.consumers if c.background]


def apply_event_fabric(aws: AwsTarget, fabric: Fabric) -> None:
    from event_bridge.apply import apply_fabric

    apply_fabric(aws, fabric)


# ---------------------------------------------------------------------------- prefect

@contextlib.contextmanager
def prefect_api(url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def ensure_work_pool(api_url: str, name: str, require_process: bool = True) -> None:
    """Create a ``process`` work pool if missing (deployments must name an existing one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with prefect_api(api_url), get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
    if require_process and pool.type != "process":
        raise StackError(f"work pool {name!r} exists with type {pool.type!r}; the local "
                         "stack needs a 'process' pool (pick another name with --pool)")


def _worker_online(api_url: str, pool: str) -> bool:
    from prefect.client.orchestration import get_client

    try:
        with prefect_api(api_url), get_client(sync_client=True) as client:
            return any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool))
    except Exception:
        return False


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "AWS_ENDPOINT_URL"}
    env.update(CLUSTERFLOW_HOME=str(home), PREFECT_HOME=str(home / "stack" / "prefect"),
               PYTHONUNBUFFERED="1", COLUMNS="200")  # rich wraps logs at 80 columns
    return env


# ---------------------------------------------------------------------------- commands

def up(home: Path, spec_path: Path = DEFAULT_SPEC, port: int | None = None,
       work_pool: str | None = None, fabric_path: Path = DEFAULT_FABRIC,
       ) -> tuple[StackState, bool]:
    """Start the stack; returns (state, started). Already running: (state, False)."""
    home = home.resolve()
    existing = load_state(home)
    if existing is not None:
        running = {n: recorded_process(c) is not None for n, c in existing.components.items()}
        if running and all(running.values()) and set(running) == set(COMPONENTS):
            return existing, False
        if any(running.values()):
            dead = ", ".join(n for n in COMPONENTS if not running.get(n))
            raise StackError(f"the local stack in {home} is partly running ({dead} not "
                             "running); run `clusterflow local down`, then `up` again")
        _forget(home, existing)
    spec = load_spec(spec_path)
    try:
        fabric = load_fabric(fabric_path)
    except FabricError as e:
        raise StackError(str(e)) from None
    work_pool = work_pool or default_work_pool()
    (home / "stack" / "prefect").mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    state = StackState(home=str(home), started_at=datetime.now(timezone.utc).isoformat(),
                       spec=str(Path(spec_path).resolve()),
                       fabric=str(Path(fabric_path).resolve()), work_pool=work_pool)
    started: list[Component] = []
    try:
        pg = LocalPostgres(home / "stack" / "postgres" / "data", _free_port())
        pg_log = logs / "postgres.log"
        pg.init()
        pg_proc = pg.start(pg_log)
        started.append(Component(name="postgres", pid=pg_proc.pid,
                                 create_time=psutil.Process(pg_proc.pid).create_time(),
                                 command=pg.command(), log=str(pg_log), url=pg.display_url))
        state.components["postgres"] = started[-1]
        state.database_port = pg.port
        _save(state)
        pg.wait_ready(pg_proc, pg_log)
        # The server is the slow one (database migration on a fresh home): start it first
        # and bring the rest up while it gets ready.
        port = port or _free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        server_env = {**_env(home), **STACK_SERVER_SETTINGS,
                      "PREFECT_API_DATABASE_CONNECTION_URL": pg.url,
                      # The UI's API address (its default is port 4200's).
                      "PREFECT_UI_API_URL": api_url}
        server, server_proc = spawn(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(port)], server_env, logs / "prefect-server.log", url=api_url)
        started.append(server)
        state.components[server.name] = server
        state.prefect_api_url = api_url
        _save(state)

        moto = MotoServer(logs / "moto.log").start()
        assert moto.proc is not None
        started.append(Component(name="moto", pid=moto.proc.pid,
                                 create_time=psutil.Process(moto.proc.pid).create_time(),
                                 command=[str(a) for a in moto.proc.args], log=str(moto.log_path),
                                 url=moto.url))
        state.components["moto"] = started[-1]
        state.moto_url = moto.url
        _save(state)
        _write_json(home / "moto.json", {"url": moto.url, "pid": moto.proc.pid})
        runner, runner_proc = spawn("runner", warm_runner.command(home),
                                     {**_env(home), "PREFECT_API_URL": api_url},
                                     logs / "runner.log")  # imports while the rest starts
        started.append(runner)
        state.components[runner.name] = runner
        _save(state)
        aws = AwsTarget(region=spec.region, endpoint_url=moto.url, embedded=True)
        apply_event_fabric(aws, fabric)
        state.consumers = background_consumers(fabric)

        wait_for("the Prefect server", lambda: healthy(f"{api_url}/health"), server_proc,
                  server.log)
        ensure_work_pool(api_url, work_pool)
        client_env = {**_env(home), **STACK_CLIENT_SETTINGS, "PREFECT_API_URL": api_url,
                      "CLUSTERFLOW_SPEC": state.spec}
        worker, worker_proc = spawn(
            "worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", work_pool, "--type", "process",
             "--name", f"clusterflow-local-{port}"], client_env, logs / "worker.log")
        started.append(worker)
        state.components[worker.name] = worker
        _save(state)

        consumers, consumers_proc = spawn(
            "consumers",
            [sys.executable, "-m", "event_bridge.cli", "consume", "--fabric", state.fabric,
             "--aws", "embedded", "--region", spec.region],
            client_env, logs / "consumers.log")
        started.append(consumers)
        state.components[consumers.name] = consumers
        _save(state)

        wait_for("the worker", lambda: _worker_online(api_url, work_pool), worker_proc,
                  worker.log)
        wait_for("the consumers", lambda: "consuming" in log_tail(consumers.log, 20000),
                  consumers_proc, consumers.log)
        wait_for("the warm runner", lambda: warm_runner.ping(home) is not None, runner_proc,
                  runner.log)
        _write_json(home / "prefect.json", {"url": api_url, "pid": server.pid})
    except BaseException as e:
        stop_components(list(reversed(started)), grace_s=10)
        _forget(home, state)
        if isinstance(e, PostgresError):
            raise StackError(str(e)) from None
        raise
    return state, True


def _forget(home: Path, state: StackState) -> None:
    for name in ("moto.json", "prefect.json"):
        path = home / name
        with contextlib.suppress(OSError, ValueError, KeyError):
            recorded = json.loads(path.read_text())["pid"]
            if any(c.pid == recorded for c in state.components.values()):
                path.unlink()
    _state_path(home).unlink(missing_ok=True)


def down(home: Path, grace_s: float = 30.0) -> dict[str, Any]:
    """Stop what ``up`` started (and their descendants); returns what was stopped."""
    home = home.resolve()
    state = load_state(home)
    if state is None:
        return {"home": str(home), "stopped": {}, "was_running": False}
    running = {n: c for n, c in state.components.items() if recorded_process(c) is not None}
    # Consumers and worker first (no new events, no new runs), then the services.
    first = [running[n] for n in ("runner", "consumers", "worker") if n in running]
    second = [running[n] for n in ("prefect-server", "moto") if n in running]
    signalled, killed = stop_components(first, grace_s)
    signalled2, killed2 = stop_components(second, grace_s)
    # PostgreSQL last, once nobody uses it: a fast shutdown through pg_ctl, so the cluster
    # stops cleanly; whatever outlives it is signalled like any component.
    third = [running["postgres"]] if "postgres" in running else []
    if third and state.database_port and _database(home, state).stop(timeout=grace_s):
        signalled2.append(third[0].pid)
    signalled3, killed3 = stop_components(third, grace_s)
    _forget(home, state)
    return {"home": str(home), "was_running": True,
            "stopped": {c.name: c.pid for c in [*first, *second, *third]},
            "pids_signalled": signalled + signalled2 + signalled3,
            "pids_killed": killed + killed2 + killed3}


def _database(home: Path, state: StackState) -> LocalPostgres:
    return LocalPostgres(home / "stack" / "postgres" / "data", state.database_port or 0)


def status(home: Path) -> dict[str, Any]:
    home = home.resolve()
    state = load_state(home)
    if state is None:
        return {"home": str(home), "state": "stopped", "components": {}}
    components: dict[str, Any] = {}
    for name in COMPONENTS:
        c = state.components.get(name)
        if c is None:
            components[name] = {"running": False}
            continue
        proc = recorded_process(c)
        info: dict[str, Any] = {"running": proc is not None, "pid": c.pid, "log": c.log}
        if c.url:
            info["url"] = c.url
        if name == "prefect-server" and proc is not None and c.url:
            info["healthy"] = healthy(f"{c.url}/health", timeout=5.0, attempts=2)
        if name == "moto" and proc is not None and c.url:
            from infra.aws.embedded import _answers

            info["healthy"] = _answers(c.url or "", attempts=2, timeout=5.0)
        if name == "runner" and proc is not None:
            info["healthy"] = warm_runner.ping(home) is not None
        if name == "postgres" and proc is not None and state.database_port:
            info["healthy"] = _database(home, state).ready()
        components[name] = info
    up_count = sum(1 for v in components.values() if v["running"])
    overall = ("running" if up_count == len(COMPONENTS)
               else "stopped" if up_count == 0 else "degraded")
    return {"home": str(home), "state": overall, "started_at": state.started_at,
            "prefect_api_url": state.prefect_api_url, "moto_url": state.moto_url,
            "database": state.components["postgres"].url if "postgres" in state.components
            else None,
            "work_pool": state.work_pool, "spec": state.spec, "fabric": state.fabric,
            "consumers": state.consumers,
            "components": components}
