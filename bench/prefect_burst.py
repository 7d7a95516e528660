"""A burst of task runs against a Prefect server on PostgreSQL and on SQLite.

A sweep creates hundreds of task runs at once; each one is several API writes (create,
Pending -> Running -> Completed). The flow here is sweep-shaped: ``--tasks`` tiny tasks
submitted at once to a thread pool of ``--threads``. For each database the harness starts its
own ``prefect server start`` (PostgreSQL: ``flows.local_postgres``, as ``clusterflow local up``
runs it; SQLite: Prefect's default), runs the flow in a subprocess against it, and counts:

- tasks completed (read back from the API), wall time of the flow run;
- 503s and "database is locked" in the server's and the client's output (the client retries
  503s, so a burst can finish and still have stalled), other errors in the client's output.

    python bench/prefect_burst.py --tasks 500          # results in bench/results/
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

CHILD = r'''
import sys, time
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

@task
def point(i: int) -> int:
    return i * i

@flow(name="burst", task_runner=ThreadPoolTaskRunner(max_workers=int(sys.argv[2])))
def burst(n: int) -> int:
    return sum(f.result() for f in [point.submit(i) for i in range(n)])

t0 = time.perf_counter()
state = burst(int(sys.argv[1]), return_state=True)
print("RESULT", state.type.value, state.state_details.flow_run_id, time.perf_counter() - t0)
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


def _task_states(url: str, flow_run_id: str) -> dict[str, int]:
    body = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}).encode()
    counts: dict[str, int] = {}
    offset = 0
    while True:
        req = urllib.request.Request(
            url + "/task_runs/filter", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({**json.loads(body), "offset": offset}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            page = json.loads(r.read())
        for t in page:
            counts[t["state_type"]] = counts.get(t["state_type"], 0) + 1
        if len(page) < 200:
            return counts
        offset += 200


def run_one(db: str, tasks: int, threads: int, work: Path) -> dict[str, Any]:
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
    try:
        child_env = {**env, "PREFECT_API_URL": url}
        child_env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tasks), str(threads)],
                              env=child_env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        out = proc.stdout + proc.stderr
        m = re.search(r"RESULT (\w+) (\S+) ([\d.]+)", proc.stdout)
        # Task run states reach the server as events, recorded asynchronously: wait until
        # the API shows every task run terminal (or give up after 5 minutes).
        states: dict[str, int] = {}
        while m and time.perf_counter() - t0 < wall + 300:
            states = _task_states(url, m.group(2))
            if sum(states.get(s, 0) for s in ("COMPLETED", "FAILED", "CRASHED")) >= tasks:
                break
            time.sleep(1)
        settled = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
        if pg is not None:
            pg.stop()
    server_log = log.read_text(errors="replace")
    text = out + server_log
    return {
        "database": db, "tasks": tasks, "threads": threads,
        "flow_state": m.group(1) if m else f"no result (exit {proc.returncode})",
        "flow_seconds": round(float(m.group(3)), 2) if m else None,
        "wall_seconds": round(wall, 2),
        "api_settled_seconds": round(settled, 2) if m else None,
        "task_runs": states,
        "completed": states.get("COMPLETED", 0),
        "http_503": len(re.findall(r"503 Service Unavailable|status code 503|HTTP/1.1\" 503",
                                   text)),
        "database_locked": text.count("database is locked"),
        "client_errors": len(re.findall(r"(?m)^.*(?:Error|Exception)\b", out)),
        "server_tracebacks": server_log.count("Traceback"),
        # What went wrong, in the server's words: each traceback's last line.
        "server_errors": sorted({m.strip() for m in re.findall(
            r"(?m)^(\w[\w.]*(?:Error|Exception|Timeout)\b.*)$", server_log)})[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        "prefect_burst.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefect-burst-") as tmp:
        os.chmod(tmp, 0o755)  # the postgres user must reach its data dir
        for db in args.databases.split(","):
            row = run_one(db, args.tasks, args.threads, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"machine": f"{platform.node()} ({os.cpu_count()} cpus)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| database | task runs | completed | flow s | all recorded after s | 503s "
          "| 'database is locked' | client errors | server tracebacks |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['database']} | {r['tasks']} | {r['completed']} | {r['flow_seconds']} "
              f"| {r['api_settled_seconds']} "
              f"| {r['http_503']} | {r['database_locked']} | {r['client_errors']} "
              f"| {r['server_tracebacks']} |")


if __name__ == "__main__":
    main()
