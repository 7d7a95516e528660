"""A sweep-shaped burst of task runs from several client processes at once, against a Prefect
server on PostgreSQL and on SQLite, side by side in one run.

A sweep on the shared stack is not one flow: several runs (users, sweep points, deployments)
write to the same server at the same time. Here ``--procs`` client processes start together
(a shared start time, after their imports) and each runs a flow that submits ``--tasks`` tiny
tasks to a thread pool of ``--threads``. For each database the harness starts its own
``prefect server start`` (PostgreSQL: ``flows.local_postgres``, as ``clusterflow local up``
runs it; SQLite: Prefect's default) and measures:

- throughput: task runs per second from the common start until the last flow returned, and
  until the API shows every task run final;
- recording lag per task run: Prefect 3 sends task runs' states over the events websocket,
  not as API calls, and the server records them asynchronously; the lag is the task run's
  row ``updated`` minus its ``end_time`` (p50/p95/max) once every one is recorded;
- every HTTP request the clients send, through a hook on httpx's ``send`` (below Prefect's
  retry loop, so each retried attempt is seen): attempts answered 503/429/502 (the Prefect
  client retries those with backoff, so a burst can finish and still have stalled), other
  5xx, and the latency of each API call as the client saw it, retries included (p50/p95/max);
- flows that did not complete, "database is locked", tracebacks in the server's log, and
  WARNING/ERROR lines in the clients' output.

    python bench/prefect_burst.py --procs 4 --tasks 200     # results in bench/results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from flows.local_postgres import LocalPostgres  # noqa: E402
from flows.prefect_runtime import LOCAL_SERVER_DEFAULTS  # noqa: E402
from infra.aws.embedded import _free_port  # noqa: E402

RETRIED = (429, 502, 503)  # the status codes Prefect's HTTP client retries

# One client process. The hooks wrap httpx's send (each attempt) and Prefect's send (one API
# call, its retries included); both are looked up at call time, so patching the classes
# before Prefect builds a client is enough.
CHILD = r'''
import json, re, sys, threading, time
import httpx

n, threads, start_at, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
attempts, calls, lock = [], [], threading.Lock()
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

def _name(request):
    return f"{request.method} {UUID.sub('{id}', request.url.path)}"

def _wrap_async(cls, sink):
    orig = cls.send
    async def send(self, request, *a, **k):
        t0 = time.perf_counter()
        status = None
        try:
            r = await orig(self, request, *a, **k)
            status = r.status_code
            return r
        finally:
            with lock:
                sink.append((_name(request), status, time.perf_counter() - t0))
    cls.send = send

def _wrap_sync(cls, sink):
    orig = cls.send
    def send(self, request, *a, **k):
        t0 = time.perf_counter()
        status = None
        try:
            r = orig(self, request, *a, **k)
            status = r.status_code
            return r
        finally:
            with lock:
                sink.append((_name(request), status, time.perf_counter() - t0))
    cls.send = send

_wrap_async(httpx.AsyncClient, attempts)
_wrap_sync(httpx.Client, attempts)
from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient
_wrap_async(PrefectHttpxAsyncClient, calls)
_wrap_sync(PrefectHttpxSyncClient, calls)

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

@task
def point(i: int) -> int:
    return i * i

@flow(name="burst", task_runner=ThreadPoolTaskRunner(max_workers=threads))
def burst(n: int) -> int:
    return sum(f.result() for f in [point.submit(i) for i in range(n)])

time.sleep(max(0.0, start_at - time.time()))
t0 = time.time()
try:
    state = burst(n, return_state=True)
    result = {"state": state.type.value, "flow_run_id": str(state.state_details.flow_run_id)}
except BaseException as e:
    result = {"state": f"raised {type(e).__name__}: {e}"[:300], "flow_run_id": None}
result |= {"started": t0, "ended": time.time(), "attempts": attempts, "calls": calls}
with open(out, "w") as f:
    json.dump(result, f)
'''


def _server(env: dict[str, str], home: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    log = home / "server.log"
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.3)


def _final_task_runs(url: str, flow_run_ids: list[str]) -> int:
    req = urllib.request.Request(
        url + "/task_runs/count", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"flow_runs": {"id": {"any_": flow_run_ids}},
                         "task_runs": {"state": {"type": {"any_": [
                             "COMPLETED", "FAILED", "CRASHED", "CANCELLED"]}}}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        return int(json.loads(r.read()))


def _task_run_lags(url: str, flow_run_ids: list[str]) -> list[float]:
    """Seconds from each final task run's end_time (the client's clock) to the server's
    last write of its row (``updated``): how far recording lagged behind the work."""
    from datetime import datetime

    lags: list[float] = []
    offset = 0
    while True:
        req = urllib.request.Request(
            url + "/task_runs/filter", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200,
                             "offset": offset}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            page = json.loads(r.read())
        for t in page:
            if t.get("end_time") and t.get("updated"):
                lags.append((datetime.fromisoformat(t["updated"])
                             - datetime.fromisoformat(t["end_time"])).total_seconds())
        if len(page) < 200:
            return lags
        offset += 200


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 1)


def run_one(db: str, procs: int, tasks: int, threads: int, work: Path) -> dict[str, Any]:
    home = work / db
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(LOCAL_SERVER_DEFAULTS, PREFECT_HOME=str(home / "prefect"))
    pg = None
    if db == "postgresql":
        pg = LocalPostgres(home / "pg" / "data", _free_port())
        pg.init()
        pg_proc = pg.start(home / "postgres.log")
        pg.wait_ready(pg_proc, home / "postgres.log")
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.url
    server, url, log = _server(env, home)
    results: list[dict[str, Any]] = []
    try:
        child_env = {**env, "PREFECT_API_URL": url}
        child_env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        # Every client imports Prefect first (2-8 s on a loaded machine), then all start at once.
        start_at = time.time() + 12 + 2 * procs
        children = []
        for k in range(procs):
            out = home / f"client-{k}.json"
            children.append((subprocess.Popen(
                [sys.executable, "-c", CHILD, str(tasks), str(threads), str(start_at), str(out)],
                env=child_env, stdout=(home / f"client-{k}.log").open("wb"),
                stderr=subprocess.STDOUT), out))
        for proc, out in children:
            proc.wait(timeout=1800)
            results.append(json.loads(out.read_text()) if out.exists() else
                           {"state": f"no result (exit {proc.returncode})", "flow_run_id": None,
                            "started": start_at, "ended": time.time(), "attempts": [],
                            "calls": []})
        flows_done = max(r["ended"] for r in results)
        ids = [r["flow_run_id"] for r in results if r["flow_run_id"]]
        recorded, settled, lags = 0, None, []
        while ids and time.time() - flows_done < 300:
            recorded = _final_task_runs(url, ids)
            if recorded >= procs * tasks:
                settled = time.time()
                break
            time.sleep(1)
        if ids:
            lags = _task_run_lags(url, ids)
    finally:
        server.terminate()
        server.wait(timeout=60)
        if pg is not None:
            pg.stop()
    server_log = log.read_text(errors="replace")
    client_logs = "".join((home / f"client-{k}.log").read_text(errors="replace")
                          for k in range(procs))
    attempts = [a for r in results for a in r["attempts"]]
    calls = [c for r in results for c in r["calls"]]
    latencies = [c[2] for c in calls]
    t0 = min(r["started"] for r in results)
    total = procs * tasks
    flow_s = flows_done - t0
    slowest: dict[str, list[float]] = {}
    for name, _, sec in calls:
        slowest.setdefault(name, []).append(sec)
    return {
        "database": db, "procs": procs, "tasks_per_proc": tasks, "threads": threads,
        "task_runs": total,
        "flows_completed": sum(r["state"] == "COMPLETED" for r in results),
        "flow_states": [r["state"] for r in results],
        "flows_seconds": round(flow_s, 2),
        "task_runs_per_s": round(total / flow_s, 1),
        "recorded": recorded,
        "all_recorded_after_s": round(settled - t0, 2) if settled else None,
        "recorded_per_s": round(total / (settled - t0), 1) if settled else None,
        "recording_lag_s": {"p50": _pct_s(lags, 0.5), "p95": _pct_s(lags, 0.95),
                            "max": _pct_s(lags, 1.0)},
        "api_calls": len(calls), "http_attempts": len(attempts),
        # What Prefect's client retries (with backoff), and which calls got them.
        "retried_attempts": sum(a[1] in RETRIED for a in attempts),
        "retried_calls": sorted({a[0] for a in attempts if a[1] in RETRIED}),
        "http_503": sum(a[1] == 503 for a in attempts),
        "http_429": sum(a[1] == 429 for a in attempts),
        "http_other_5xx": sum(a[1] is not None and a[1] >= 500 and a[1] not in RETRIED
                              for a in attempts),
        "latency_ms": {"p50": _pct(latencies, 0.5), "p95": _pct(latencies, 0.95),
                       "max": _pct(latencies, 1.0)},
        "max_ms_by_call": {k: _pct(v, 1.0) for k, v in sorted(slowest.items())},
        "database_locked": (server_log + client_logs).count("database is locked"),
        "client_warnings": len(re.findall(r"(?m)\b(?:WARNING|ERROR|CRITICAL)\b", client_logs)),
        "server_tracebacks": server_log.count("Traceback"),
        "server_errors": sorted({m.strip() for m in re.findall(
            r"(?m)^(\w[\w.]*(?:Error|Exception|Timeout)\b.*)$", server_log)})[:10],
    }


def _pct_s(values: list[float], q: float) -> float | None:
    ms = _pct(values, q)
    return None if ms is None else round(ms / 1000, 1)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--tasks", type=int, default=200, help="task runs per process")
    parser.add_argument("--threads", type=int, default=32, help="task threads per process")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the databases")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        "prefect_burst.json")
    args = parser.parse_args()
    rows = []
    dbs = args.databases.split(",")
    with tempfile.TemporaryDirectory(prefix="prefect-burst-") as tmp:
        os.chmod(tmp, 0o755)  # the postgres user must reach its data dir
        for rnd in range(args.rounds):
            for db in (dbs if rnd % 2 == 0 else dbs[::-1]):
                load = _load()
                row = run_one(db, args.procs, args.tasks, args.threads,
                              Path(tmp) / f"round{rnd}")
                row |= {"round": rnd, "load_before": load, "load_after": _load()}
                print(json.dumps(row), flush=True)
                rows.append(row)
    report = {"machine": f"{platform.node()} ({os.cpu_count()} cpus)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| database | clients x task runs | flows completed | flows s | task runs/s "
          "| all recorded after s | recording lag p50 / p95 s | 503s (retried) | other 5xx "
          "| API call p50 / p95 / max ms | 'database is locked' | server tracebacks | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        lat, lag = r["latency_ms"], r["recording_lag_s"]
        print(f"| {r['database']} | {r['procs']} x {r['tasks_per_proc']} "
              f"| {r['flows_completed']}/{r['procs']} | {r['flows_seconds']} "
              f"| {r['task_runs_per_s']} | {r['all_recorded_after_s']} "
              f"| {lag['p50']} / {lag['p95']} | {r['http_503']} | {r['http_other_5xx']} "
              f"| {lat['p50']} / {lat['p95']} / {lat['max']} | {r['database_locked']} "
              f"| {r['server_tracebacks']} | {r['load_before']} |")

if __name__ == "__main__":
    main()
