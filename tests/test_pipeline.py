"""The pipelined engine's own failure cases (RFC 2920), against raw asyncio servers that
chunk replies the way real servers and networks do."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import make_message
from prometheus_client import CollectorRegistry
from smtpserver import FaultyServer

from pool import DeliveryError, SMTPPool

pytestmark = pytest.mark.timeout(30)


class ScriptedServer:
    """A minimal pipelining SMTP server: reads whatever arrived, answers every
    complete command in it, and writes the answers either all at once (many replies
    in one segment) or one byte per segment."""

    def __init__(self, *, bytewise: bool = False, refuse_mail: int = 0, data_354_always: bool = False) -> None:
        self.bytewise = bytewise
        self.refuse_mail = refuse_mail
        self.data_354_always = data_354_always
        self.bodies: list[bytes] = []
        self.commands: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._send(writer, [b"220 scripted ESMTP"])
            buffer = b""
            in_data = False
            mail_ok = False
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                replies: list[bytes] = []
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if buffer.startswith(b".\r\n"):
                            body, buffer = b"", buffer[3:]
                        elif end >= 0:
                            body, buffer = buffer[: end + 2], buffer[end + 5 :]
                        else:
                            break
                        in_data = False
                        if body:
                            self.bodies.append(body)
                            replies.append(b"250-queued\r\n250 as X1")
                        else:
                            replies.append(b"554 5.5.1 no valid recipients")
                        continue
                    end = buffer.find(b"\r\n")
                    if end < 0:
                        break
                    line, buffer = buffer[:end], buffer[end + 2 :]
                    verb = line[:4].upper()
                    self.commands.append(verb)
                    if verb == b"EHLO":
                        replies.append(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME")
                    elif verb == b"MAIL":
                        mail_ok = self.refuse_mail <= 0
                        self.refuse_mail -= 1
                        replies.append(b"250 2.1.0 ok" if mail_ok else b"550 5.7.1 sender refused")
                    elif verb == b"RCPT":
                        replies.append(b"250-recipient\r\n250 2.1.5 ok" if mail_ok else b"503 5.5.1 need MAIL")
                    elif verb == b"DATA":
                        if mail_ok or self.data_354_always:
                            in_data = True
                            replies.append(b"354 go ahead")
                        else:
                            replies.append(b"503 5.5.1 need RCPT")
                    elif verb == b"RSET":
                        replies.append(b"250 2.0.0 reset")
                    elif verb == b"QUIT":
                        await self._send(writer, [*replies, b"221 bye"])
                        return
                    else:
                        replies.append(b"500 unknown")
                if replies:
                    await self._send(writer, replies)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _send(self, writer: asyncio.StreamWriter, replies: list[bytes]) -> None:
        wire = b"".join(r + b"\r\n" for r in replies)
        if not self.bytewise:
            writer.write(wire)
            await writer.drain()
            return
        for i in range(len(wire)):
            writer.write(wire[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)  # let each byte leave as its own segment


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(**getattr(request, "param", {})) as srv:
        yield srv


def pool_for(port: int, **kwargs: Any) -> SMTPPool:
    options: dict[str, Any] = {"hostname": "127.0.0.1", "port": port, "size": 1, "timeout": 5.0,
                               "backoff_base": 0.001, "backoff_max": 0.01}
    options.update(kwargs)
    return SMTPPool(**options)


@pytest.mark.parametrize("scripted", [{"bytewise": False}, {"bytewise": True}], indirect=True,
                         ids=["many-replies-per-segment", "one-byte-per-segment"])
async def test_replies_are_matched_in_order_however_they_are_chunked(scripted: ScriptedServer) -> None:
    messages = [make_message(i, [f"a{i}@example.net", f"b{i}@example.net"]) for i in range(20)]
    async with pool_for(scripted.port) as pool:
        results = await asyncio.gather(*(pool.submit(m) for m in messages))
    assert [sorted(r.accepted) for r in results] == [sorted(m["To"].split(", ")) for m in messages]
    assert all(r.response == "queued\nas X1" for r in results), "multi-line replies are joined"
    assert all(r.attempts == 1 for r in results)
    assert len(scripted.bodies) == 20


@pytest.mark.parametrize("scripted", [{"refuse_mail": 1}], indirect=True)
async def test_refused_mail_with_rcpt_and_data_in_flight_sends_no_content(scripted: ScriptedServer) -> None:
    async with pool_for(scripted.port) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1, ["a@example.net", "b@example.net"]))
    assert (failed.value.code, failed.value.permanent, failed.value.attempts) == (550, True, 1)
    assert scripted.commands[:5] == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert b"RSET" in scripted.commands
    assert scripted.bodies == []


@pytest.mark.parametrize("scripted", [{"refuse_mail": 1, "data_354_always": True}], indirect=True)
async def test_data_accepted_without_recipients_gets_an_empty_message(scripted: ScriptedServer) -> None:
    """RFC 2920 section 3.1: a 354 after every RCPT failed is answered with a lone dot."""
    async with pool_for(scripted.port) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1))
        after = await pool.submit(make_message(2))  # the session stays in step
    assert failed.value.permanent is True
    assert after.response == "queued\nas X1"
    assert len(scripted.bodies) == 1


async def test_drop_with_two_messages_in_flight(server: FaultyServer) -> None:
    """The message whose end of DATA was sent is ambiguous; the one whose envelope
    was sent behind it is simply unsent, and both are retried."""
    server.faults.drop_after_data = 1
    server.gate = asyncio.Event()
    registry = CollectorRegistry()
    async with pool_for(server.port, registry=registry) as pool:
        first = asyncio.create_task(pool.submit(make_message(1)))
        second = asyncio.create_task(pool.submit(make_message(2)))
        await server.wait_for(lambda: server.data_started == 1)
        server.gate.set()
        one, two = await asyncio.gather(first, second)
    assert (one.attempts, two.attempts) == (2, 2)
    assert registry.get_sample_value("smtp_pool_ambiguous_total") == 1
    assert [(m.message_id, m.reply_dropped) for m in server.messages] == [
        ("<m1@test.local>", True), ("<m1@test.local>", False), ("<m2@test.local>", False)
    ] or [(m.message_id, m.reply_dropped) for m in server.messages] == [
        ("<m1@test.local>", True), ("<m2@test.local>", False), ("<m1@test.local>", False)
    ]


async def test_421_to_the_pipelined_next_envelope_keeps_the_previous_delivery(server: FaultyServer) -> None:
    server.faults.close_after_messages = 1  # the second MAIL is answered 421, then hang-up
    async with pool_for(server.port) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(3)))
    hung_up = [s for s in server.sessions if not s.quit]
    assert hung_up and all(s.messages == 1 for s in hung_up)
    assert sum(r.attempts - 1 for r in results) == len(hung_up), "each 421 costs exactly one retry"
    assert all(count == 1 for count in server.deliveries().values())
    assert len(server.messages) == 3


@pytest.mark.parametrize("pipelining, most_reads", [(None, 2.0), (False, None)], ids=["pipelined", "command"])
async def test_pipelining_needs_one_read_per_message(server: FaultyServer, pipelining: bool | None,
                                                      most_reads: float | None) -> None:
    """The server's socket sees about one read per message when pipelined, four or
    more (MAIL, RCPT, DATA, content) command by command."""
    async with pool_for(server.port, pipelining=pipelining) as pool:
        await asyncio.gather(*(pool.submit(make_message(i)) for i in range(200)))
    reads_per_message = server.sessions[0].reads / 200
    if most_reads is None:
        assert reads_per_message >= 4
    else:
        assert reads_per_message <= most_reads


async def test_no_pipelining_advertised_falls_back_to_command_by_command() -> None:
    async with FaultyServer(pipelining=False) as srv:
        async with pool_for(srv.port) as pool:
            await asyncio.gather(*(pool.submit(make_message(i)) for i in range(50)))
        assert srv.sessions[0].reads / 50 >= 4
        assert len(srv.messages) == 50


async def test_large_content_is_sent_whole(server: FaultyServer) -> None:
    body = ("x" * 998 + "\n") * 2000  # ~2 MB: more than the transport's write buffer
    async with pool_for(server.port) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i, body=body)) for i in range(3)))
    assert all(r.attempts == 1 for r in results)
    assert all(len(m.content) > 2_000_000 for m in server.messages)


async def test_timeout_counts_from_the_command_not_from_an_earlier_reply(server: FaultyServer) -> None:
    """A message sent late in the timer's window gets the full timeout for its replies."""
    timeout = 0.4
    async with pool_for(server.port, timeout=timeout) as pool:
        await pool.submit(make_message(1))
        await asyncio.sleep(timeout * 0.75)  # the session idles most of one timeout window
        server.faults.mail_delay = timeout * 0.5  # the next reply is slow, but well within timeout
        result = await pool.submit(make_message(2))
    assert result.attempts == 1
    assert server.connections_made == 1


def test_sessions_are_pipelined_on_uvloop_too() -> None:
    """dispatcher runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> tuple[bool, int]:
        async with FaultyServer() as srv:
            async with SMTPPool(hostname=srv.host, port=srv.port, size=1) as pool:
                await pool.submit(make_message(1))
                pipelined = pool._slots[0].connection.pipelined
            return pipelined, len(srv.messages)

    assert uvloop.run(run()) == (True, 1)


async def test_replies_wait_for_the_transport_to_drain_when_its_buffer_is_full() -> None:
    """The transport said its buffer is full (pause_writing): what was queued is written,
    and the replies are handed over only once it drains, however early they came."""
    from pool.pipeline import PipelineProtocol

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"250 ok " + line.split()[0] + b"\r\n")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
        pipe = PipelineProtocol(transport, 5.0)  # type: ignore[arg-type]
        transport.set_protocol(pipe)
        pipe.pause_writing()
        sent = pipe.send(b"NOOP\r\n", 1)
        waiting = asyncio.ensure_future(pipe.replies(sent))
        assert await asyncio.wait_for(asyncio.shield(sent), 5) == [(250, "ok NOOP")]  # written, answered
        assert not waiting.done()  # ... and held until the buffer drains
        pipe.resume_writing()
        assert await asyncio.wait_for(waiting, 5) == [(250, "ok NOOP")]
        assert await pipe.replies(pipe.send(b"RSET\r\n", 1)) == [(250, "ok RSET")]  # not paused: at once
        pipe.abort()
    finally:
        server.close()
        await server.wait_closed()
