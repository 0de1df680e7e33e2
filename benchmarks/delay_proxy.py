"""A delaying TCP proxy on loopback: every chunk waits ``delay_ms`` in each direction.

    python -m benchmarks.delay_proxy --target-port 2525 --delay-ms 1   # 2 ms round trip

Prints ``LISTENING <port>`` on stdout once it accepts connections. Runs in its own
process (uvloop when available) so that it does not share the client's CPU. Order is
kept per direction: chunks wait in a FIFO served by one timer, never by one timer
per chunk (asyncio's timer heap does not keep equal deadlines in order).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys

_HIGH_WATER = 4 * 1024 * 1024


class _Direction(asyncio.Protocol):
    """One side of a proxied connection: what it reads is written to ``peer`` later."""

    def __init__(self, delay: float, peer: _Direction | None = None) -> None:
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self._pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._pending.append((self._loop.time() + self.delay, data))
        if self._timer is None:
            self._timer = self._loop.call_at(self._pending[0][0], self._flush)

    def eof_received(self) -> bool:
        self._eof = True
        if self._timer is None:
            self._flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if self._timer is None:
            self._flush()

    def _flush(self) -> None:
        self._timer = None
        peer = self.peer
        now = self._loop.time()
        pending = self._pending
        while pending and pending[0][0] <= now + 0.0002:
            data = pending.popleft()[1]
            if peer is not None and peer.transport is not None and not peer.transport.is_closing():
                peer.transport.write(data)
        if pending:
            self._timer = self._loop.call_at(pending[0][0], self._flush)
        elif self._eof and peer is not None and peer.transport is not None:
            peer.transport.close()

    # The peer's write buffer is full: stop reading from this side until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


async def serve(listen_host: str, listen_port: int, target_host: str, target_port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()

    class _Client(_Direction):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            transport.pause_reading()  # type: ignore[attr-defined]
            self._upstream = loop.create_task(self._connect_upstream())  # owned by the proxy connection

        async def _connect_upstream(self) -> None:
            assert self.transport is not None
            try:
                # The upstream knows its peer from birth: the greeting may arrive before
                # this coroutine resumes.
                _, upstream = await loop.create_connection(lambda: _Direction(delay, self), target_host, target_port)
            except OSError:
                self.transport.close()
                return
            self.peer = upstream
            for side in (self, upstream):
                assert side.transport is not None
                side.transport.set_write_buffer_limits(high=_HIGH_WATER)
            self.transport.resume_reading()

    server = await loop.create_server(lambda: _Client(delay), listen_host, listen_port, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delay_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=1.0, help="delay each way (round trip = twice this)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    coro = serve(args.listen_host, args.listen_port, args.target_host, args.target_port, args.delay_ms / 1000)
    try:
        if args.loop == "uvloop":
            try:
                import uvloop
            except ImportError:
                asyncio.run(coro)
            else:
                uvloop.run(coro)
        else:
            asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
