"""TCP relays in front of a real redis-server, for faults a server alone cannot make."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class SilentRelay:
    """Relays to Redis on ``redis_port``; the first connection to carry an EVALSHA goes
    silent after ``let_through`` of them (a NAT or balancer that dropped it: no close, no
    reply)."""

    redis_port: int
    let_through: int = 1
    #: Connections opened after the silent one.
    after: list[object] = field(default_factory=list)
    _victim: list[object] = field(default_factory=list)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = object()
        if self._victim:
            self.after.append(me)
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        evalshas = 0

        async def back() -> None:
            while data := await redis_r.read(65536):
                client_w.write(data)

        pump = asyncio.ensure_future(back())
        try:
            while data := await client_r.read(65536):
                if b"EVALSHA" in data and not self._victim:
                    self._victim.append(me)
                if self._victim and self._victim[0] is me:
                    evalshas += data.count(b"EVALSHA")
                    if evalshas > self.let_through:
                        continue  # silent from then on
                redis_w.write(data)
        finally:
            pump.cancel()
            redis_w.close()
            client_w.close()

    async def start(self) -> tuple[asyncio.Server, int]:
        """The listening relay and its port."""
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]
