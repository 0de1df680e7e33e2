"""A real ``redis-server`` for tests: a free 127.0.0.1 port, a temporary directory, AOF on.

    redis = RedisServer(tmp_path / "redis")
    await redis.start()                 # waits for "Ready to accept connections"
    redis.url                           # redis://127.0.0.1:PORT/0
    await redis.restart()               # stop (SIGTERM, or kill=True: SIGKILL) and start
    await redis.stop()                  # again on the same port and directory (same AOF)

Every write is fsynced before Redis answers (``--appendfsync always``), so a restart —
even after SIGKILL — keeps everything a client saw acknowledged. ``require_redis()``
skips a test when ``redis-server`` is not installed, and fails it instead under
``CI=true``: the point of these tests is the real server's semantics, never a fake.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Self

from _support import free_port, missing

READY = b"Ready to accept connections"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def require_redis() -> str:
    """The path of ``redis-server``; skip (locally) or fail (CI=true) when missing."""
    binary = redis_server_binary()
    if binary is None:
        reason = ("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server); "
                  "the Redis tests need a real server")
        missing(reason)
    return binary


class RedisServer:
    """One ``redis-server`` process, restartable on the same port and directory."""

    def __init__(self, directory: Path, *, port: int | None = None, password: str | None = None) -> None:
        self.binary = require_redis()
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.starts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, timeout: float = 10.0) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--daemonize", "no", "--logfile", "", "--databases", "1",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self._process = await asyncio.create_subprocess_exec(
            self.binary, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        log: list[bytes] = []
        assert self._process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self._process.stdout.readline()
                    if not line:
                        raise RuntimeError("redis-server exited at start:\n" + b"".join(log).decode(errors="replace"))
                    log.append(line)
                    if READY in line:
                        break
        except BaseException:
            await self._kill()
            raise
        self.starts += 1
        # Keep reading its log so that the pipe never fills; this object owns the task.
        self._drain = asyncio.create_task(self._read_log(self._process.stdout))
        return self

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (Redis finishes its AOF and exits) or, with ``kill``, SIGKILL."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            await self._drain
            self._drain = None
        self._process = None

    async def _kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self._process = None

    async def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds (clients see refused connections), start
        again on the same port and directory: the AOF brings every acknowledged write back."""
        await self.stop(kill=kill)
        if down_for:
            await asyncio.sleep(down_for)
        await self.start()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(kill=True)
