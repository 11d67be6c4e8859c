"""Fetching a query image from a URL, only when the operator allowed it (`--allow-image-urls`).

Server-side fetching lets a client make the server connect anywhere it can reach (SSRF), so:
http(s) only; every address the host name resolves to must be public (no loopback, private,
link-local, multicast or reserved ranges: no cloud metadata endpoint, no LAN service); the
connection goes to the address that was checked (a second DNS answer cannot swap it); redirects
are not followed; a timeout bounds the whole exchange and the body is capped.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from retriever.errors import UserError

TIMEOUT_S = 10.0


class UrlRefused(UserError):
    """The URL is not one this server will fetch (400)."""


def is_public(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_global


def fetch_image_url(url: str, max_bytes: int, timeout: float = TIMEOUT_S) -> bytes:
    """The bytes at `url`, or UrlRefused / UserError in one sentence."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused("Only http and https image URLs are fetched.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UrlRefused(f"The image URL's host {parts.hostname!r} does not resolve.") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses or not all(is_public(a) for a in addresses):
        raise UrlRefused("The image URL points to a private or local address; this server does not fetch those.")
    conn = _connection(parts.scheme, parts.hostname, addresses[0], port, timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "retriever-serve", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise UserError(f"The image URL answered HTTP {resp.status} (redirects are not followed).")
        data = resp.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"Could not fetch the image URL ({e.__class__.__name__}).") from None
    finally:
        conn.close()
    if len(data) > max_bytes:
        raise UrlRefused(f"The image at that URL is larger than this server's limit of {max_bytes} bytes.")
    return data


def _connection(scheme: str, host: str, ip: str, port: int, timeout: float) -> http.client.HTTPConnection:
    """A connection to the checked address `ip`, with TLS verified against `host`."""

    class Pinned(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.create_connection((ip, port), timeout)

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self):
            raw = socket.create_connection((ip, port), timeout)
            self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)

    cls = PinnedTLS if scheme == "https" else Pinned
    return cls(host, port, timeout=timeout)
