"""One TLS context for all of a process's Prefect API clients.

Prefect (3.x) builds a new ``ssl.SSLContext`` for every API client it opens, loading
certifi's CA bundle each time (about 150 certificates, 20-25 ms of CPU on this 2-core VM).
A ``clusterflow run`` opens about seven: the flow engine's client, the events worker's and
the version check it makes, the log worker's, and one per artifact. Three of them are built
in background threads while the run's main thread creates the flow run, so they hold the GIL
on its critical path.
The context depends only on two Prefect settings, so it is built once per pair of values and
shared: an ``SSLContext`` is meant to be shared by many connections and threads. The warm
runner builds it before forking, so a run through it builds none.

Prefect's own rules are kept: a client given its own ``verify`` keeps it, ``PREFECT_API_TLS_
INSECURE_SKIP_VERIFY`` and ``PREFECT_API_SSL_CERT_FILE`` mean what they mean to Prefect
(read when each client is made, so a run's own environment still decides). If a Prefect
upgrade changes the clients' constructor, ``install`` leaves them alone.
"""

from __future__ import annotations

import functools
import inspect
import ssl
import threading
from typing import Any

_lock = threading.Lock()
_contexts: dict[tuple[bool, str], ssl.SSLContext] = {}
_MARK = "_clusterflow_shared_tls"


def _settings() -> tuple[bool, str]:
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    return (bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
            PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


def shared_context() -> ssl.SSLContext:
    """The context Prefect would build for a client now, built once per setting values."""
    key = _settings()
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            skip_verify, cafile = key
            if skip_verify:  # as Prefect does: default trust store, no verification
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = ssl.create_default_context(cafile=cafile)
            _contexts[key] = ctx
        return ctx


def install() -> bool:
    """Give Prefect's sync and async API clients the shared context; False if it cannot."""
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient

    for cls in (PrefectClient, SyncPrefectClient):
        original = cls.__init__
        if getattr(original, _MARK, False):
            continue
        if "httpx_settings" not in inspect.signature(original).parameters:
            return False

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, _original: Any = original,
                     httpx_settings: dict[str, Any] | None = None, **kwargs: Any) -> None:
            settings = dict(httpx_settings or {})
            if "verify" not in settings:
                settings["verify"] = shared_context()
            _original(self, *args, httpx_settings=settings, **kwargs)

        setattr(__init__, _MARK, True)
        cls.__init__ = __init__  # type: ignore[method-assign]
    return True
