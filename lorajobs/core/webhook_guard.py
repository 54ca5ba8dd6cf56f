"""Which webhook URLs the service may call: the SSRF guard, at registration and per attempt.

A tenant names the URL; the service's own network is behind it. So a URL is refused when its
host resolves to any address that is not globally routable (loopback, RFC 1918 private,
link-local such as the cloud metadata address 169.254.169.254, multicast, reserved,
unspecified, CGNAT, IPv4-mapped forms of these ...), unless
`settings.webhook_allow_private_addresses` (a lab network, the tests' loopback receiver).
It is checked at registration and again before every attempt, because DNS can change, and the
attempt then connects to the addresses that were checked (`Target.addresses`, in order), not
to a second lookup's answer (DNS rebinding). `https` only, unless `settings.webhook_allow_http`; no
credentials in the URL (they would be logged and shown to every key of the tenant).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from lorajobs.core.errors import InvalidRequest
from lorajobs.core.settings import Settings

__all__ = ["UnsafeURL", "Target", "check_url", "resolve_target", "host_header", "reason_text",
           "MAX_URL_LENGTH"]

MAX_URL_LENGTH = 2048  # webhook_endpoints.url
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(InvalidRequest):
    """The URL may not be called (scheme, form, or where its host resolves)."""

    code = "webhook_url_refused"


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts and the address an attempt connects to."""

    url: str
    scheme: str
    host: str  # as written (a name, or an address without brackets)
    port: int
    addresses: tuple[str, ...]  # every address the name resolved to, all checked, in order

    @property
    def address(self) -> str:
        return self.addresses[0]


def check_url(url: str, settings: Settings) -> tuple[str, str, int]:
    """(scheme, host, port) of a well-formed URL we may call, else UnsafeURL (no DNS yet)."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"url is longer than {MAX_URL_LENGTH} characters", param="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"url is not a valid URL: {exc}", param="url") from exc
    allowed = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in allowed:
        raise UnsafeURL(f"url must use {' or '.join(allowed)}, not {parts.scheme or 'nothing'!r}",
                        param="url")
    if not parts.hostname:
        raise UnsafeURL("url has no host", param="url")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("url must not carry credentials (user:password@)", param="url")
    if parts.fragment:
        raise UnsafeURL("url must not have a #fragment", param="url")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _refusal(address: IPAddress) -> str | None:
    """Why `address` may not be called, or None. IPv4-mapped/6to4 forms are judged as IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is not None:
            return _refusal(inner)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    if not address.is_global:
        return "not globally routable"
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnsafeURL(f"url host {host!r} does not resolve: {exc}", param="url") from exc
    # An IPv6 scope id ("fe80::1%eth0") is dropped: the address itself is what is judged.
    found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return list(dict.fromkeys(found))


def resolve_target(url: str, settings: Settings) -> Target:
    """Check `url` and resolve its host now: a Target to connect to, or UnsafeURL.

    Every address the name resolves to must be allowed: an attacker's name with one public
    and one private record must not win the connection race."""
    scheme, host, port = check_url(url, settings)
    addresses = _resolve(host, port)
    if not addresses:
        raise UnsafeURL(f"url host {host!r} resolves to no address", param="url")
    if not settings.webhook_allow_private_addresses:
        for address in addresses:
            reason = _refusal(address)
            if reason is not None:
                raise UnsafeURL(
                    f"url host {host!r} resolves to {address}, a {reason} address; webhooks "
                    "may only call public addresses (LORAJOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES)",
                    param="url")
    return Target(url=url, scheme=scheme, host=host, port=port,
                  addresses=tuple(str(a) for a in addresses))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True




def host_header(target: Target) -> str:
    """The Host header the receiver expects: the name as written, with a non-default port."""
    host = f"[{target.host}]" if ":" in target.host and _is_ip(target.host) else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def reason_text(exc: Exception) -> str:
    """A one-line reason for an attempt record."""
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
