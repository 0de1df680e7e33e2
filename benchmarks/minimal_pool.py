"""The reference "no features" pool: K long-lived aiosmtplib sessions on an asyncio.Queue.

No retries, no per-recipient bookkeeping, no metrics, no rate limit, no reconnects:
what a user would write in an afternoon. SMTPPool is measured against it, so it is kept
deliberately small (about 40 lines) and as fast as aiosmtplib allows.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib


class MinimalPool:
    def __init__(self, hostname: str, port: int, size: int, tls_ca: str | None = None) -> None:
        self.hostname, self.port, self.size, self.tls_ca = hostname, port, size, tls_ca
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
        self._workers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> MinimalPool:
        tls = {"use_tls": True, "cert_bundle": self.tls_ca} if self.tls_ca else {"start_tls": False}
        clients = [aiosmtplib.SMTP(hostname=self.hostname, port=self.port, **tls) for _ in range(self.size)]
        await asyncio.gather(*(client.connect() for client in clients))
        self._workers = [asyncio.create_task(self._worker(client)) for client in clients]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _ in self._workers:
            await self._queue.put(None)
        await asyncio.gather(*self._workers)

    async def submit(self, raw: bytes, sender: str, recipients: list[str]) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((raw, sender, recipients, future))
        return await future

    async def _worker(self, client: aiosmtplib.SMTP) -> None:
        while (item := await self._queue.get()) is not None:
            raw, sender, recipients, future = item
            try:
                future.set_result(await client.sendmail(sender, recipients, raw))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
        await client.quit()
