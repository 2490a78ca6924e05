"""The upstream host's addresses: looked up once for many connections, tried in turn."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Final

from aiohappyeyeballs import AddrInfoType as AddrInfo

#: How long a lookup's answer is used (aiohttp's ``ttl_dns_cache`` was the same).
DNS_TTL_S: Final = 300.0
#: How long a failed lookup is not repeated: a resolver that fails fast must not get one
#: lookup per request.
DNS_RETRY_S: Final = 1.0


class Resolver:
    """``getaddrinfo`` for one host and port, shared by every connection made while one runs,
    kept :data:`DNS_TTL_S`, and rotated so each new connection starts at the next address
    (a dead address then costs one connection its Happy Eyeballs delay, not every one).

    A failed refresh keeps the addresses already known; only when there are none does the
    failure reach the caller, and then again for :data:`DNS_RETRY_S` without a new lookup.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._infos: list[AddrInfo] = []
        self._until = 0.0  # when the next lookup is due (monotonic)
        self._error: OSError | None = None
        self._turn = 0
        self._suspect = False  # the known addresses all failed: wait for the next lookup
        self._lookup: asyncio.Future[None] | None = None

    async def addresses(self) -> list[AddrInfo]:
        """The addresses, the next one first each call. Once some are known a refresh runs
        in the background: a slow resolver never holds a connection up."""
        if time.monotonic() >= self._until:
            if self._lookup is None or self._lookup.done():
                self._lookup = asyncio.ensure_future(self._refresh())
            if not self._infos or self._suspect:
                # shield: one waiter's cancellation must not cancel the shared lookup
                await asyncio.shield(self._lookup)
        if not self._infos:
            assert self._error is not None
            # (the traceback dropped: each raise would grow the cached error's)
            raise self._error.with_traceback(None)
        infos, turn = self._infos, self._turn % len(self._infos)
        self._turn += 1
        return infos[turn:] + infos[:turn]

    def failed(self) -> None:
        """Every address failed to connect: the next connection waits for a new lookup."""
        self._until, self._suspect = 0.0, True

    async def _refresh(self) -> None:
        try:
            await self._look_up()
        finally:
            self._suspect = False  # one lookup answers the doubt, whatever it finds

    async def _look_up(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
            )
        except OSError as exc:
            self._error, self._until = exc, time.monotonic() + DNS_RETRY_S
            return
        infos: list[AddrInfo] = [i for i in found if i[0] in (socket.AF_INET, socket.AF_INET6)]
        if not infos:
            self._error = socket.gaierror(socket.EAI_NONAME, f"no address for {self.host}")
            self._until = time.monotonic() + DNS_RETRY_S
            return
        self._infos = infos
        self._error, self._until = None, time.monotonic() + DNS_TTL_S
