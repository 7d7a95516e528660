"""The thin side of ``clusterflow run`` on a warm local stack: hand the run to the stack's runner.

A ``clusterflow run`` in a fresh interpreter pays Prefect's import (~1.2-1.4 s on a 2-core
VM) before its flow starts, more than the whole fixed-overhead budget of a run. The local
stack keeps one process that has imported Prefect, the pipeline and boto3 already
(``flows.warm_runner``); this client, which imports only the standard library, connects to
its Unix socket and hands over the run: argv, cwd, environment, umask, which signals the
caller ignores, how its stdio is encoded, and the stdin/stdout/stderr file descriptors
themselves (``SCM_RIGHTS``). The runner forks a child that runs the command exactly as the
CLI would in-process, writing to the caller's own terminal or pipes. Signals the client gets
(Ctrl-C, SIGTERM, SIGHUP) are passed on to that child, and the child's exit status becomes
the client's, so a caller cannot tell the two apart except by the time they take.

Anything else falls back to today's in-process run: no socket, a runner that does not answer,
one that says it is stale (the installed code changed since it started) or belongs to another
installation, or ``CLUSTERFLOW_NO_WARM_RUNNER=1``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

ENV_OFF = "CLUSTERFLOW_NO_WARM_RUNNER"
SOCKET_NAME = "runner.sock"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")
_MAX_PATH = 100  # sun_path holds 108 bytes


def home_dir() -> str:
    """``infra.aws.embedded.state_dir()`` without pathlib: where the stack keeps its state."""
    return os.path.realpath(os.environ.get("CLUSTERFLOW_HOME", ".clusterflow"))


def socket_path(home: str) -> str:
    """The runner's socket for the stack in ``home`` (a short one under /tmp for long homes)."""
    path = os.path.join(home, SOCKET_NAME)
    if len(path.encode()) <= _MAX_PATH:
        return path
    import hashlib  # only for long homes: the common path imports as little as it can

    digest = hashlib.sha256(home.encode()).hexdigest()[:16]
    return os.path.join("/tmp", f"clusterflow-runner-{os.getuid()}-{digest}.sock")


def package_dir() -> str:
    """The installed ``flows`` package this client belongs to (a runner of another refuses)."""
    return os.path.dirname(os.path.realpath(__file__))


def send_msg(sock: socket.socket, obj: object, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    frame = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame], fds)
        sock.sendall(frame[sent:])
    else:
        sock.sendall(frame)


def _exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_msg(sock: socket.socket, maxfds: int = 0) -> tuple[dict | None, list[int]]:
    """One framed message (None at end of stream) and the descriptors sent with it (the
    ancillary data rides on the frame's first byte, so the header is read with it)."""
    fds: list[int] = []
    if maxfds:
        head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, maxfds)
        if head and len(head) < _HEADER.size:
            head += _exact(sock, _HEADER.size - len(head)) or b""
    else:
        head = _exact(sock, _HEADER.size) or b""
    body = _exact(sock, _HEADER.unpack(head)[0]) if len(head) == _HEADER.size else None
    if body is None:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(body), list(fds)


def _stdio() -> list[list[object]]:
    out = []
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if stream is None:
            out.append([])
            continue
        out.append([stream.encoding, stream.errors, stream.line_buffering,
                    getattr(stream, "write_through", False)])
    return out


def request(argv: list[str]) -> dict[str, object]:
    """What the runner needs to run ``argv`` as this process would."""
    mask = os.umask(0o022)
    os.umask(mask)
    return {"op": "run", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
            "umask": mask, "package": package_dir(), "stdio": _stdio(),
            "ignored": [int(s) for s in FORWARDED if signal.getsignal(s) is signal.SIG_IGN]}


def connect(home: str | None = None, timeout: float = 10.0) -> socket.socket | None:
    path = socket_path(home or home_dir())
    if not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def run_warm(argv: list[str]) -> int | None:
    """Run ``argv`` (``sys.argv``) through the warm runner; its exit status, or None when the
    caller should run in-process instead. Does not return when the run died of a signal."""
    if os.environ.get(ENV_OFF) == "1":
        return None
    sock = connect()
    if sock is None:
        return None
    with sock:
        try:
            send_msg(sock, request(argv), fds=[0, 1, 2])
            reply, _ = recv_msg(sock)
        except OSError:
            return None
        if not reply or not reply.get("ok"):
            return None  # stale, another installation's, or refusing: run in-process
        sock.settimeout(None)  # from here the run takes as long as it takes
        try:
            send_msg(sock, {"go": True})  # until now the runner's child waits: no double run
        except OSError:
            return None

        def forward(signum: int, _frame: object) -> None:
            try:
                send_msg(sock, {"signal": signum})
            except OSError:
                pass

        for sig in FORWARDED:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, forward)
        try:
            while True:
                msg, _ = recv_msg(sock)
                if msg is None:  # the runner went away mid-run (e.g. `local down`)
                    sys.stderr.write("error: the local stack's runner stopped during the "
                                     "run (clusterflow local down?)\n")
                    return 1
                if "exit" in msg:
                    return int(msg["exit"])
                if "signal" in msg:  # the run died of a signal: so does this process
                    signum = int(msg["signal"])
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                    return 128 + signum
        finally:
            for sig in FORWARDED:
                if signal.getsignal(sig) is forward:
                    signal.signal(sig, signal.SIG_DFL)
