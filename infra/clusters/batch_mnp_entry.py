#!/usr/bin/env python3
"""The entry point of every node of an AWS Batch multi-node parallel job (standard library only,
so it can be copied into any image that has python3).

    batch_mnp_entry.py [--ranks N] [--mpirun "mpirun"] [--mpirun-arg A ...] -- COMMAND ...

Batch starts the main node first and gives every node ``AWS_BATCH_JOB_NODE_INDEX``,
``AWS_BATCH_JOB_MAIN_NODE_INDEX`` and ``AWS_BATCH_JOB_NUM_NODES``; only the *child* nodes get
``AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS``, so the main node uses its own address.

- main node: listens on ``--port``, waits until every child has registered ``<ip> <slots>``,
  writes the hostfile (itself first), runs ``mpirun --hostfile H -n N [args] COMMAND``, tells
  every child the job is over, and exits with mpirun's exit code (which is the job's status:
  Batch takes it from the main node).
- inputs/results (``$CLUSTERFLOW_STAGE_IN`` / ``$CLUSTERFLOW_STAGE_OUT``, set by the pipeline):
  every node downloads the inputs (``python -m infra.staging.s3_job in``) before it joins; the
  main node uploads the results with their sums after mpirun succeeded (``... out``).
- child node: optionally starts sshd (mpirun reaches the children over ssh; the image provides
  the key), registers with the main node, then waits for "done" (or the main node going away)
  and exits 0. Batch stops the children when the main node exits anyway.

Own address: ``CLUSTERFLOW_NODE_IP`` if set; a child uses the local address of its connection
to the main node; the main node the address of the interface that routes outward (no packet
is sent). Slots per node: ``--slots`` or ``CLUSTERFLOW_SLOTS_PER_NODE``, else the CPU count.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PORT = 7897


def log(msg: str) -> None:
    index = os.environ.get("AWS_BATCH_JOB_NODE_INDEX", "?")
    print(f"[clusterflow-mnp node {index}] {msg}", file=sys.stderr, flush=True)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise SystemExit(f"{name} is not set: this script runs inside an AWS Batch multi-node "
                         "parallel job (or set the AWS_BATCH_JOB_* variables yourself)")
    return int(value)


def stage(direction: str) -> int:
    """``infra.staging.s3_job`` when the job's environment asks for it (else nothing): inputs
    onto this node before the ranks start, results to S3 after they succeeded. A subprocess,
    so this script itself stays standard-library only."""
    if not os.environ.get("CLUSTERFLOW_STAGE_IN" if direction == "in" else
                          "CLUSTERFLOW_STAGE_OUT"):
        return 0
    rc = subprocess.call([sys.executable, "-m", "infra.staging.s3_job", direction])
    if rc:
        log(f"staging {direction} failed with exit code {rc}")
    return rc


def own_address() -> str:
    if os.environ.get("CLUSTERFLOW_NODE_IP"):
        return os.environ["CLUSTERFLOW_NODE_IP"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect: picks the route, sends nothing
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def slots(args: argparse.Namespace) -> int:
    return int(args.slots or os.environ.get("CLUSTERFLOW_SLOTS_PER_NODE") or os.cpu_count() or 1)


def _registration_ok(words: list[str]) -> bool:
    if len(words) != 2 or not (words[1].isascii() and words[1].isdigit()) \
            or not 0 < int(words[1]) < 100000:
        return False
    try:
        ipaddress.ip_address(words[0])
    except ValueError:
        return False
    return True


def run_main(args: argparse.Namespace, num_nodes: int) -> int:
    if not args.command:
        log("no command after '--': nothing to run")
        return 2
    rc = stage("in")
    if rc:
        return rc
    me = own_address()
    hosts = [(me, slots(args))]
    children: list[socket.socket] = []
    deadline = time.monotonic() + args.join_timeout
    with socket.create_server(("", args.port), reuse_port=False) as server:
        server.settimeout(1.0)
        log(f"main node {me}: waiting for {num_nodes - 1} child node(s) on port {args.port}")
        while len(children) < num_nodes - 1:
            if time.monotonic() > deadline:
                log(f"only {len(children)} of {num_nodes - 1} child node(s) joined within "
                    f"{args.join_timeout:.0f} s")
                for c in children:
                    c.close()
                return 3
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(30)
            line = conn.makefile("r").readline().split()
            if not _registration_ok(line):
                # It becomes a line of mpirun's hostfile: an address and a count, nothing else.
                log(f"ignored a registration that is not '<ip> <slots>': {line!r:.80}")
                conn.close()
                continue
            hosts.append((line[0], int(line[1])))
            children.append(conn)
            log(f"child {line[0]} joined with {line[1]} slot(s)")
    hostfile = Path(args.hostfile)
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"{h} slots={n}\n" for h, n in hosts))
    ranks = args.ranks or sum(n for _, n in hosts)
    cmd = [*shlex.split(args.mpirun), "--hostfile", str(hostfile), "-n", str(ranks),
           *args.mpirun_arg, *args.command]
    log("running: " + " ".join(shlex.quote(c) for c in cmd))
    try:
        rc = subprocess.call(cmd)
    finally:
        for c in children:
            try:
                c.sendall(b"done\n")
            except OSError:
                pass
            c.close()
    log(f"mpirun exited with {rc}")
    return rc or stage("out")


def run_child(args: argparse.Namespace) -> int:
    main_ip = os.environ.get("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS")
    if not main_ip:
        raise SystemExit("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS is not set on a child "
                         "node")
    rc = stage("in")  # every node reads its own verified copy of the inputs
    if rc:
        return rc
    if args.start_sshd:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        subprocess.check_call([sshd])
    deadline = time.monotonic() + args.join_timeout
    while True:
        try:
            conn = socket.create_connection((main_ip, args.port), timeout=5)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                log(f"cannot reach the main node {main_ip}:{args.port}: {e}")
                return 3
            time.sleep(1)
    with conn:
        me = os.environ.get("CLUSTERFLOW_NODE_IP") or conn.getsockname()[0]
        conn.sendall(f"{me} {slots(args)}\n".encode())
        log(f"registered {me} with the main node {main_ip}")
        conn.settimeout(None)
        reply = conn.makefile("r").readline().strip()
    log("main node finished" if reply == "done" else "main node went away")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=None, help="MPI ranks (default: all slots)")
    p.add_argument("--slots", type=int, default=None, help="ranks per node")
    p.add_argument("--mpirun", default=os.environ.get("CLUSTERFLOW_MPIRUN", "mpirun"))
    p.add_argument("--mpirun-arg", action="append", default=[])
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--hostfile", default="/tmp/clusterflow-hostfile")
    p.add_argument("--join-timeout", type=float, default=600.0)
    p.add_argument("--start-sshd", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    num_nodes = _env_int("AWS_BATCH_JOB_NUM_NODES")
    index = _env_int("AWS_BATCH_JOB_NODE_INDEX")
    main_index = _env_int("AWS_BATCH_JOB_MAIN_NODE_INDEX")
    if index == main_index:
        return run_main(args, num_nodes)
    return run_child(args)


if __name__ == "__main__":
    sys.exit(main())
