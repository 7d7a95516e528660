"""CIDRs and durations as the guard accepts them, refused with a message a user can act on."""

from __future__ import annotations

import ipaddress
import re

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_ALLOWED = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
_TTL_RE = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class GuardInputError(ValueError):
    """A CIDR, TTL or allowlist entry the guard refuses (exit 2, nothing changed)."""


def parse_cidr(text: str) -> Network:
    """``203.0.113.7`` -> ``203.0.113.7/32``; host bits set is refused, not silently widened."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        loose = None
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            pass
        hint = f"; did you mean {loose}?" if loose is not None else ""
        raise GuardInputError(f"{text!r} is not a CIDR ({e}){hint}") from None
    return net


def canonical(text: str | None) -> str | None:
    """A CIDR as Python writes it, for comparing with what AWS hands back: services return a
    block in the form they stored (``2400:6500:03a8:6900::/56``, a leading zero kept), so the
    same network can be two strings. Text that is not a CIDR comes back as it is."""
    if text is None:
        return None
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        return text


def parse_ttl(text: str | None) -> int | None:
    """``90s``/``30m``/``24h``/``7d`` -> seconds; ``never``/``none`` -> no expiry."""
    if text is None or text.strip().lower() in ("never", "none", "0"):
        return None
    m = _TTL_RE.match(text.strip().lower())
    if not m:
        raise GuardInputError(f"TTL {text!r} must look like 90s, 30m, 24h, 7d or 'never'")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def allowlisted(net: Network, allowlist: list[Network]) -> Network | None:
    """The allowlisted network ``net`` overlaps (blocking it would cut that network off)."""
    for allowed in (*ALWAYS_ALLOWED, *allowlist):
        if allowed.version == net.version and (net.overlaps(allowed) and (
                allowed.prefixlen > 0 or net.prefixlen == 0)):
            return allowed
    return None
