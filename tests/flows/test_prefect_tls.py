"""A run's Prefect clients share one TLS context, built as Prefect would build it."""

from __future__ import annotations

import ssl

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    temporary_settings,
)

from flows import prefect_tls


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[ssl.SSLContext]:
    """Every SSL context built from here on (Prefect's, or the shared one)."""
    made: list[ssl.SSLContext] = []
    original = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(original(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    monkeypatch.setattr(prefect_tls, "_contexts", {})
    return made


def _context(client: object) -> ssl.SSLContext:
    return client._client._transport._pool._ssl_context  # type: ignore[attr-defined]


def test_clients_share_one_verifying_context(built: list[ssl.SSLContext]) -> None:
    assert prefect_tls.install() and prefect_tls.install()  # idempotent
    with temporary_settings(updates={PREFECT_API_URL: "https://prefect.example/api"}):
        clients = [get_client(sync_client=True), get_client(), get_client(sync_client=True),
                   get_client()]
    assert len(built) == 1, "one CA bundle load for four clients"
    assert all(_context(c) is built[0] for c in clients)
    assert built[0].verify_mode == ssl.CERT_REQUIRED and built[0].check_hostname
    assert built[0].cert_store_stats()["x509_ca"] > 100  # certifi's bundle, as Prefect loads


def test_prefects_settings_still_decide(built: list[ssl.SSLContext]) -> None:
    prefect_tls.install()
    with temporary_settings(updates={PREFECT_API_URL: "https://prefect.example/api",
                                     PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = get_client(sync_client=True)
    with temporary_settings(updates={PREFECT_API_URL: "https://prefect.example/api"}):
        verified = get_client(sync_client=True)
    assert _context(insecure).verify_mode == ssl.CERT_NONE
    assert _context(verified).verify_mode == ssl.CERT_REQUIRED
    own = ssl.create_default_context()
    with temporary_settings(updates={PREFECT_API_URL: "https://prefect.example/api"}):
        given = get_client(httpx_settings={"verify": own})
    assert _context(given) is own  # a caller's own context is kept
