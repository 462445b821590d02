"""Fetching ``{"url": ...}`` images without becoming an SSRF proxy.

- Only ``http`` and ``https``; every redirect target is checked again (scheme and address), at most
  ``max_redirects`` of them.
- Addresses are checked *after* resolution, inside the connector's resolver, so the address connected
  to is the address checked (no DNS rebinding between a check and the connection). IP-literal hosts,
  which bypass resolvers, are checked before the request.
- Refused unless ``allow_private``: loopback, private (RFC 1918, ULA), link-local (cloud metadata at
  169.254.169.254), multicast, unspecified, reserved and anything else not globally routable,
  IPv4-mapped IPv6 included.
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


def address_refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be fetched from, or ``None`` when it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    except ValueError:
        return "it is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    ):
        if flag:
            return f"{ip} is a {kind} address"
    return None


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


class UrlFetcher:
    def __init__(self, *, allow_private: bool, timeout_s: float, max_bytes: int, max_redirects: int) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow_private), limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"User-Agent": "captionfleet-runtime"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url_text: str, allowance: BodyAllowance | None = None) -> bytes:
        """The bytes at ``url_text``; raises UrlRefused, UrlFetchFailed or PayloadTooLarge. With the
        request's ``allowance``, the fetched bytes count against the process's body budget too."""
        try:
            url = URL(url_text.strip())
        except (ValueError, TypeError) as exc:
            raise UrlRefused(f"not a valid URL: {exc}") from exc
        if not url.is_absolute():
            raise UrlRefused("the URL must be absolute (http:// or https://)")
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
