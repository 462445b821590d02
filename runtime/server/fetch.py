"""Fetching ``{"url": ...}`` images without becoming an SSRF proxy.

- Only ``http`` and ``https``; every redirect target is checked again (scheme and address), at most
  ``max_redirects`` of them.
- Addresses are checked *after* resolution, inside the connector's resolver, so the address connected
  to is the address checked (no DNS rebinding between a check and the connection). IP-literal hosts,
  which bypass resolvers, are checked before the request.
- Refused unless ``allow_private``: loopback, private (RFC 1918, ULA), link-local (cloud metadata at
  169.254.169.254), multicast, unspecified, reserved and anything else not globally routable, and
  IPv6 addresses that embed such an IPv4 address (mapped, compatible, 6to4, Teredo, NAT64).
- The whole fetch (redirects included) has one time limit, and the body is streamed against a size
  limit (a declared Content-Length over it is refused before reading). No proxy from the environment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from captionfleet.runtime.web.body import BodyAllowance, read_all
from captionfleet.runtime.web.errors import PayloadTooLarge, UrlFetchFailed, UrlRefused

ALLOWED_SCHEMES = frozenset({"http", "https"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: a network's own translators
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291, deprecated, still routed by some stacks


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address stands for, by form: a packet to it may reach them (a 6to4
    relay, a Teredo server or client, a NAT64 translator, a dual stack), so each must be public too."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are IPv6's own unspecified and loopback
        found.append(("IPv4-compatible", low32))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:  # (server, client); Python inverts the client's bits as RFC 4380 says
        found.extend((("Teredo server", ip.teredo[0]), ("Teredo client", ip.teredo[1])))
    if ip in NAT64_WELL_KNOWN:
        found.append(("NAT64", low32))
    return found


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        # Deprecated (RFC 3879) but still routed inside old networks; Python counts it as global.
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    ):
        if flag:
            return f"{ip} is a {kind} address"
    return None


def address_refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be fetched from, or ``None`` when it is public.

    An IPv6 address that embeds an IPv4 one (mapped, compatible, 6to4, Teredo, NAT64) is refused when
    the embedded address is not public (``http://[2002:7f00:1::]/`` is 127.0.0.1 through 6to4). A
    mapped or well-known-prefix NAT64 address is then judged as the IPv4 address it stands for; the
    local-use NAT64 prefix is refused whole, since where the IPv4 address sits in it is the network's
    choice (RFC 6052 allows six prefix lengths).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    except ValueError:
        return "it is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL_USE:
            return f"{ip} is a local-use NAT64 address (64:ff9b:1::/48), not globally routable"
        for form, inner in embedded_ipv4(ip):
            reason = _refusal(inner)
            if reason is not None:
                return f"{ip} embeds {inner} ({form}): {reason}"
        if ip.ipv4_mapped is not None or ip in NAT64_WELL_KNOWN:
            return None  # the embedded address, checked above, is where the packets go
    return _refusal(ip)


class RefusedAddress(OSError):
    """Raised by the resolver: an OSError, so aiohttp passes it on inside its connector error."""


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's threaded resolver, then drops every address that may not be fetched."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        allowed = [r for r in results if address_refusal(r["host"]) is None]
        if not allowed:
            reasons = "; ".join(sorted({address_refusal(r["host"]) or "" for r in results})) or "no address"
            raise RefusedAddress(f"{host} resolves only to addresses that may not be fetched ({reasons})")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def check_url(url: URL, allow_private: bool) -> None:
    """Refuse a URL by its scheme, host and (for IP literals) address; names are checked on resolution."""
    if url.scheme not in ALLOWED_SCHEMES:
        raise UrlRefused(f"only http and https URLs can be fetched, not {url.scheme or 'a relative'!r} ones")
    host = url.raw_host
    if not host:
        raise UrlRefused("the URL has no host")
    if allow_private:
        return
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if host.rstrip(".").lower() == "localhost" or host.rstrip(".").lower().endswith(".localhost"):
            raise UrlRefused("localhost may not be fetched") from None
        return
    reason = address_refusal(host)
    if reason is not None:
        raise UrlRefused(f"the URL's host may not be fetched: {reason}")


def guarded_session(allow_private: bool, timeout_s: float, *, connections: int) -> aiohttp.ClientSession:
    """A client session whose connections go only to addresses the guard allows, with one total time
    limit per request and no proxy from the environment."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private), limit=connections)
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"User-Agent": "captionfleet-runtime"},
    )


def absolute_url(text: str, what: str = "the URL") -> URL:
    """``text`` as an absolute URL, or :class:`UrlRefused`."""
    try:
        url = URL(text.strip())
    except (ValueError, TypeError) as exc:
        raise UrlRefused(f"{what} is not a valid URL: {exc}") from exc
    if url.scheme == "data":  # hostless, so "not absolute" below would mislead: say where it belongs
        raise UrlRefused(
            f"{what} is a data: URL, which is not fetched (only http and https are); "
            "an image's bytes go in image_base64"
        )
    if not url.is_absolute():
        raise UrlRefused(f"{what} must be absolute (http:// or https://)")
    return url


class GuardedClient:
    """An outgoing HTTP client behind the SSRF guard, its session opened on first use."""

    connections = 64

    def __init__(self, *, allow_private: bool, timeout_s: float) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(self.allow_private, self.timeout_s, connections=self.connections)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class UrlFetcher(GuardedClient):
    def __init__(self, *, allow_private: bool, timeout_s: float, max_bytes: int, max_redirects: int) -> None:
        super().__init__(allow_private=allow_private, timeout_s=timeout_s)
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects

    async def fetch(self, url_text: str, allowance: BodyAllowance | None = None) -> bytes:
        """The bytes at ``url_text``; raises UrlRefused, UrlFetchFailed or PayloadTooLarge. With the
        request's ``allowance``, the fetched bytes count against the process's body budget too."""
        url = absolute_url(url_text)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(url, allowance)
        except TimeoutError as exc:
            raise UrlFetchFailed(f"fetching the URL took longer than {self.timeout_s:g} s") from exc

    async def _follow(self, url: URL, allowance: BodyAllowance | None) -> bytes:
        session = self._client()
        for _ in range(self.max_redirects + 1):
            check_url(url, self.allow_private)
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in REDIRECT_STATUSES:
                        location = response.headers.get("Location")
                        if not location:
                            raise UrlFetchFailed(f"the URL answered {response.status} without a Location")
                        url = response.url.join(URL(location))
                        continue
                    if response.status != 200:
                        raise UrlFetchFailed(f"the URL answered HTTP {response.status}")
                    declared = response.content_length
                    if declared is not None and declared > self.max_bytes:
                        raise PayloadTooLarge(f"the URL's content is {declared} bytes, over {self.max_bytes}")
                    return await read_all(response.content, allowance, self.max_bytes, what="URL's content")
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    raise UrlRefused(str(exc.os_error)) from exc
                raise UrlFetchFailed(f"could not connect to {url.host}: {exc.os_error}") from exc
            except (aiohttp.InvalidURL, ValueError) as exc:
                raise UrlRefused(f"the URL (or a redirect's Location) is not acceptable: {exc}") from exc
            except aiohttp.ClientError as exc:
                raise UrlFetchFailed(f"fetching the URL failed: {exc}") from exc
        raise UrlRefused(f"more than {self.max_redirects} redirects")
