"""Fetch an image URL for media.py, only from hosts the operator allows and only from public
addresses, within byte, time and redirect limits.

The host is resolved once per hop, every address it resolves to must be public, and the
connection goes to the address that was checked (pinned), so a name that resolves again to a
private address between the check and the connect (DNS rebinding) reaches nothing. HTTPS still
verifies the certificate against the host name. Redirects are followed by hand, each hop checked
again (scheme, allowed host, addresses). Proxies from the environment are not used.

Blocking; the caller runs it in a worker thread. getaddrinfo cannot be cut short: a resolver
that hangs holds the thread for the system resolver's own timeout (about 5 s per attempt).
"""

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from qwen35_ray.serving.errors import OpenAIError

if TYPE_CHECKING:
    from qwen35_ray.serving.media import MediaLimits

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024


# NAT64's well-known prefix: the last 32 bits are the IPv4 address reached
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not private, loopback, link-local (cloud metadata at
    169.254.169.254), shared (100.64/10), multicast, reserved or unspecified; an IPv6 address
    that carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by that one too."""
    if not (ip.is_global and not ip.is_multicast):
        return False
    if ip.version == 6:
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return all(is_public_address(v4) for v4 in embedded if v4 is not None)
    return True


def fetch(
    url: str,
    limits: "MediaLimits",
    param: str,
    address_ok: Callable = is_public_address,
) -> tuple[str, bytes]:
    """GET url -> (Content-Type, body), or an OpenAIError 400 naming the limit it broke."""
    deadline = time.monotonic() + limits.fetch_timeout_s
    for _ in range(limits.max_redirects + 1):
        host, port, ip, https = _check_url(url, limits, param, address_ok)
        conn = _connection(host, port, ip, https, _left(deadline, limits, param))
        try:
            target = urlsplit(url)
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
            conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "qwen35-ray"})
            response = conn.getresponse()
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise OpenAIError(
                    f"{param}: fetching the image URL gave HTTP {response.status}", param=param
                )
            body = _read(response, conn.pinned, deadline, limits, param)
            return response.getheader("Content-Type") or "", body
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, TimeoutError) or time.monotonic() >= deadline:
                raise _timed_out(limits, param) from None
            raise OpenAIError(
                f"{param}: fetching the image URL failed ({e})", param=param
            ) from None
        finally:
            conn.close()
    raise OpenAIError(
        f"{param}: the image URL redirected more than max_redirects={limits.max_redirects} "
        "times; send the final URL",
        param=param,
    )


def _check_url(url: str, limits, param: str, address_ok: Callable):
    """(host, port, the checked address to connect to, https) of an allowed URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise OpenAIError(f"{param}: the image URL is malformed", param=param) from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".").lower()
    if scheme not in ("http", "https") or not host:
        raise OpenAIError(
            f"{param}: image URLs must be http(s) with a host, got {url[:80]!r}", param=param
        )
    allowed = {d.rstrip(".").lower() for d in limits.allowed_media_domains}
    if host not in allowed:
        how = (
            "no image URLs are fetched: list the hosts to fetch from in allowed_media_domains "
            "in the app config, or send the image as a data: URI"
            if not allowed
            else "add it to allowed_media_domains in the app config, or send a data: URI"
        )
        raise OpenAIError(f"{param}: host {host[:80]!r} is not allowed; {how}", param=param)
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise OpenAIError(
            f"{param}: the image host {host!r} does not resolve ({e})", param=param
        ) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    refused = [str(a) for a in addresses if not address_ok(a)]
    if refused or not addresses:
        raise OpenAIError(
            f"{param}: the image host {host!r} resolves to a non-public address "
            f"({', '.join(refused[:3])}); images are never fetched from private, loopback or "
            "link-local addresses",
            param=param,
        )
    return host, port, str(addresses[0]), scheme == "https"


def _connection(host: str, port: int, ip: str, https: bool, timeout: float):
    if https:
        return _PinnedHTTPS(host, port, ip, timeout, ssl.create_default_context())
    return _PinnedHTTP(host, port, ip, timeout)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address; the Host header keeps the name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self):
        self.sock = self.pinned = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """Connects to the checked address; SNI and the certificate check use the name."""

    def __init__(self, host: str, port: int, ip: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.ip, self.tls = ip, context

    def connect(self):
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self.pinned = self.tls.wrap_socket(sock, server_hostname=self.host)


def _read(response, sock: socket.socket, deadline: float, limits, param: str) -> bytes:
    """The body, each read given the time left (the connection may have handed the socket to
    the response, so the socket comes from connect())."""
    cap = limits.max_image_bytes
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _too_big(f"{int(length):,} bytes", limits, param)
    body = bytearray()
    # the response closes the socket once it has read Content-Length bytes
    while not response.isclosed():
        sock.settimeout(_left(deadline, limits, param))
        chunk = response.read1(CHUNK)
        if not chunk:
            break
        body += chunk
        if len(body) > cap:
            raise _too_big(f"over {cap:,} bytes", limits, param)
    return bytes(body)


def _left(deadline: float, limits, param: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(limits, param)
    return left


def _timed_out(limits, param: str) -> OpenAIError:
    return OpenAIError(
        f"{param}: fetching the image URL took longer than fetch_timeout_s="
        f"{limits.fetch_timeout_s:g}; send the image as a data: URI",
        param=param,
    )


def _too_big(what: str, limits, param: str) -> OpenAIError:
    return OpenAIError(
        f"{param}: the image at the URL is {what}; max_image_bytes allows "
        f"{limits.max_image_bytes:,}; send a smaller image or raise max_image_bytes",
        param=param,
    )
