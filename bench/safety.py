"""The generator only ever targets this machine: refuse anything but loopback addresses."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class NonLoopbackTarget(ValueError):
    """The target URL is not on 127.0.0.0/8, ::1 or localhost."""


def is_loopback_host(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def require_loopback(url: str) -> str:
    """Return `url` (without a trailing slash) if it points at loopback; raise otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise NonLoopbackTarget(f"refusing target {url!r}: only http(s) URLs are supported")
    host = parts.hostname or ""
    if not is_loopback_host(host):
        raise NonLoopbackTarget(
            f"refusing target {url!r}: the load generator only runs against this machine "
            f"(127.0.0.0/8, ::1 or localhost), not {host or 'an empty host'!r}")
    return url.rstrip("/")
