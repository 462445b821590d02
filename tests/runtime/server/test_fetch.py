"""Fetching image URLs: the SSRF guard, redirects re-checked, size and time limits.

A real aiohttp server on loopback plays the remote site; loopback is private, so fetches that must
succeed run with ``allow_private=True`` and the refusals are checked both with and without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from yarl import URL

from captionfleet.runtime.server.fetch import (
    GuardedResolver,
    RefusedAddress,
    UrlFetcher,
    address_refusal,
    check_url,
)
from captionfleet.runtime.web.errors import PayloadTooLarge, UrlFetchFailed, UrlRefused

IMAGE = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "fe80::1",
     "fc00::1", "224.0.0.1", "ff02::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "100.64.0.1",
     "240.0.0.1", "255.255.255.255", "192.0.2.1", "fec0::1", "feff::1"],  # fec0::/10: IPv6 site-local
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4
        ("2002:a00:1:1::1", "10.0.0.1"),
        ("2002:a9fe:a9fe::", "169.254.169.254"),
        ("2001:0:808:808:0:0:80ff:fffe", "127.0.0.1"),  # Teredo: public server, client inverted
        ("2001:0:a00:1:0:0:f7f7:f7f7", "10.0.0.1"),  # Teredo: private server, public client
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64, well-known prefix
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::c0a8:101", "192.168.1.1"),
        ("::ffff:7f00:1", "127.0.0.1"),  # IPv4-mapped
        ("::ffff:a9fe:a9fe", "169.254.169.254"),
        ("::7f00:1", "127.0.0.1"),  # IPv4-compatible
        ("::a00:1", "10.0.0.1"),
    ],
)
def test_ipv6_forms_of_non_public_ipv4_addresses_are_refused(address: str, embedded: str) -> None:
    reason = address_refusal(address)
    assert reason is not None and f"embeds {embedded}" in reason, reason
    with pytest.raises(UrlRefused, match=f"embeds {embedded}"):
        check_url(URL(f"http://[{address}]/image.png"), allow_private=False)


@pytest.mark.parametrize("address", ["64:ff9b:1::7f00:1", "64:ff9b:1::808:808", "64:ff9b:1:7f00:1::"])
def test_the_local_use_nat64_prefix_is_refused_whole(address: str) -> None:
    assert "local-use NAT64" in (address_refusal(address) or "")


@pytest.mark.parametrize("address", ["::ffff:8.8.8.8", "64:ff9b::808:808", "64:ff9b::5db8:d70e"])
def test_ipv6_forms_of_public_ipv4_addresses_are_judged_by_the_ipv4_address(address: str) -> None:
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://example.com/", "http://127.0.0.1/x",
     "http://[::1]:8080/x", "http://[2002:7f00:1::]/", "http://localhost/x", "http://api.localhost/x", "http://169.254.169.254/latest"],
)  # fmt: skip
def test_urls_refused_before_any_connection(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(URL(url), allow_private=False)


def test_allow_private_still_refuses_other_schemes() -> None:
    check_url(URL("http://127.0.0.1/x"), allow_private=True)
    with pytest.raises(UrlRefused):
        check_url(URL("file:///etc/passwd"), allow_private=True)


async def test_names_are_checked_after_resolution() -> None:
    # A name that resolves to loopback: the address actually connected to is the one refused.
    with pytest.raises(RefusedAddress, match="may not be fetched"):
        await GuardedResolver(allow_private=False).resolve("localhost", 80)
    assert await GuardedResolver(allow_private=True).resolve("localhost", 80)


@pytest.fixture
async def site() -> AsyncIterator[str]:
    never = asyncio.Event()

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        hops = int(request.match_info["hops"])
        target = "/image.png" if hops == 0 else f"/redirect/{hops - 1}"
        raise web.HTTPFound(target)

    async def to_file(request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: the limit must apply while streaming
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"\0" * 65536)
        return response

    async def slow(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/image.png", image)
    app.router.add_get("/redirect/{hops}", redirect)
    app.router.add_get("/to-file", to_file)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    never.set()
    await runner.cleanup()


@pytest.fixture
async def fetcher() -> AsyncIterator[UrlFetcher]:
    fetcher = UrlFetcher(allow_private=True, timeout_s=0.5, max_bytes=1024 * 1024, max_redirects=3)
    yield fetcher
    await fetcher.close()


async def test_fetches_and_follows_redirects_within_the_limit(site: str, fetcher: UrlFetcher) -> None:
    assert await fetcher.fetch(site + "/image.png") == IMAGE
    assert await fetcher.fetch(site + "/redirect/2") == IMAGE  # 3 redirects
    with pytest.raises(UrlRefused, match="redirects"):
        await fetcher.fetch(site + "/redirect/3")  # 4 redirects


async def test_every_redirect_is_checked_again(site: str, fetcher: UrlFetcher) -> None:
    with pytest.raises(UrlRefused, match="http and https"):
        await fetcher.fetch(site + "/to-file")


async def test_a_private_site_is_refused_without_allow_private(site: str) -> None:
    strict = UrlFetcher(allow_private=False, timeout_s=1, max_bytes=1024, max_redirects=3)
    try:
        with pytest.raises(UrlRefused):
            await strict.fetch(site + "/image.png")
    finally:
        await strict.close()


async def test_size_time_and_status_limits(site: str, fetcher: UrlFetcher) -> None:
    with pytest.raises(PayloadTooLarge):
        await fetcher.fetch(site + "/big")
    with pytest.raises(UrlFetchFailed, match="longer than"):
        await fetcher.fetch(site + "/slow")
    with pytest.raises(UrlFetchFailed, match="404"):
        await fetcher.fetch(site + "/missing")
    with pytest.raises(UrlFetchFailed):
        await fetcher.fetch("http://127.0.0.1:1/nothing-listens-here")
    with pytest.raises(UrlRefused):
        await fetcher.fetch("not a url at all")
