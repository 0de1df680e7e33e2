"""One SMTP transaction — MAIL, RCPT per recipient, DATA, content — and its outcome.

Everything about a single exchange is here; ``pool.py`` only routes the ``Outcome``.

- command by command (aiosmtplib): ``Transaction.start`` runs every command, one
  reply at a time, and the outcome is known when it returns.
- pipelined (RFC 2920, when the server advertises PIPELINING): ``start`` writes MAIL,
  every RCPT and DATA in one write, reads their replies, queues the content after the
  354 and returns; ``finish`` reads the reply to the end of DATA. A worker that starts
  the next transaction before finishing this one puts the end of DATA and the next
  envelope on the wire together: one round trip per message.

A transaction never leaves its session mid-transaction: a refusal before the content
is followed by RSET, and anything else (lost session, a reply that breaks the
protocol, a bug, cancellation) closes the session.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiosmtplib
from aiosmtplib import SMTPException

from pool.envelope import END_OF_DATA, Envelope, xtext
from pool.errors import ConnectionFailed, Refusals
from pool.retry import SERVICE_CLOSING, is_permanent, is_positive, is_throttling, readable

if TYPE_CHECKING:
    from pool.connection import Connection
    from pool.pipeline import PipelineProtocol

#: (code, text) of one server reply.
Reply = tuple[int, str]

#: RFC 6531 section 3.7.4.1 names this reply for a non-ASCII address a server cannot take.
NO_SMTPUTF8: Reply = (553, "5.6.7 the relay does not offer SMTPUTF8, needed for a non-ASCII address (RFC 6531)")
NO_SMTPUTF8_HEADERS: Reply = (554, "5.6.7 the relay does not offer SMTPUTF8, needed for non-ASCII header text "
                                   "(RFC 6532)")
NO_8BITMIME: Reply = (554, "5.6.3 the relay does not offer 8BITMIME, needed for a body with 8-bit bytes (RFC 6152)")
START_DATA = 354
RSET = b"RSET\r\n"
_STUFFED_LINE = re.compile(rb"\n\.\.")


@dataclass(slots=True)
class Outcome:
    """What one attempt did for each recipient it carried.

    ``accepted`` took the message (``delivered`` is the end-of-DATA reply);
    ``refused`` said no for good (5xx); ``deferred`` said not now (4xx, or the session
    was lost before the end of DATA) and are retried. ``reply`` is the reply that
    decided a failure, for the caller's error. ``ambiguous``: the session was lost after
    the end of DATA was sent and before its reply — the server may have the message.
    ``session_lost``: the session cannot be used again. ``throttled``: a reply asked us
    to slow down (docs/library.md promise 12).
    """

    accepted: list[str] = field(default_factory=list)
    refused: Refusals = field(default_factory=dict)
    deferred: Refusals = field(default_factory=dict)
    delivered: Reply | None = None
    reply: tuple[int | None, str] = (None, "")
    ambiguous: bool = False
    session_lost: bool = False
    throttled: bool = False
    unsent: bool = False  # lost before any of it reached the server: the attempt does not count


def lost(recipients: tuple[str, ...], exc: ConnectionFailed, *, ambiguous: bool | None = None,
         unsent: bool = False) -> Outcome:
    """The session ended before every reply came: nothing was refused, all are retried.
    ``ambiguous`` (default: the error's) says the server may have the message; ``unsent``
    that none of it reached the server."""
    reply = (exc.code or 0, exc.reason)
    return Outcome(
        deferred=dict.fromkeys(recipients, reply),
        reply=(exc.code, exc.reason),
        ambiguous=exc.ambiguous if ambiguous is None else ambiguous,
        session_lost=True,
        unsent=unsent,
        throttled=exc.code is not None and is_throttling(exc.code, exc.text if exc.text is not None else exc.reason),
    )


def _outcome(recipients: tuple[str, ...], mail: Reply, rcpt: list[Reply], data: Reply | None) -> Outcome:
    """Fold the replies of one transaction into an Outcome (RFC 5321 section 4.2.1:
    2yz/3yz positive, 4yz transient, 5yz permanent)."""
    out = Outcome()
    replies = [mail, *rcpt] if data is None else [mail, *rcpt, data]
    out.throttled = any(is_throttling(code, text) for code, text in replies)
    if not is_positive(mail[0]):
        out.reply = mail
        target = out.refused if is_permanent(mail[0]) else out.deferred
        for address in recipients:
            target[address] = mail
        return out
    candidates: list[str] = []
    for address, reply in zip(recipients, rcpt, strict=True):
        if is_positive(reply[0]):
            candidates.append(address)
        else:
            (out.refused if is_permanent(reply[0]) else out.deferred)[address] = reply
            out.reply = reply
    if candidates:
        assert data is not None
        if is_positive(data[0]):
            out.accepted = candidates
            out.delivered = data
        else:
            out.reply = data
            target = out.refused if is_permanent(data[0]) else out.deferred
            for address in candidates:
                target[address] = data
    return out


def mail_parameters(envelope: Envelope, recipients: tuple[str, ...], *, smtputf8: bool,
                    eightbitmime: bool, dsn: bool = False) -> list[bytes] | Reply:
    """The MAIL FROM parameters ``envelope`` needs on a session that offers what the
    flags say, or the permanent refusal when it lacks one: nothing 8-bit goes out
    undeclared. Non-ASCII addresses or header text need SMTPUTF8 (RFC 6531, 6532); an
    8-bit body needs BODY=8BITMIME (RFC 6152), which SMTPUTF8 implies (RFC 6531 section
    3.1) when the server does not list it."""
    params: list[bytes] = []
    utf8 = envelope.utf8_headers or not envelope.ascii_addresses(recipients)
    if utf8:
        if not smtputf8:
            return NO_SMTPUTF8_HEADERS if envelope.ascii_addresses(recipients) else NO_SMTPUTF8
        params.append(b"SMTPUTF8")
    if envelope.eight_bit or envelope.utf8_headers:
        if eightbitmime:
            params.append(b"BODY=8BITMIME")
        elif not utf8:
            return NO_8BITMIME
    if dsn and envelope.envelope_id is not None:
        # RFC 3461: a bounce returns only the headers and names this envelope.
        params += [b"RET=HDRS", b"ENVID=" + xtext(envelope.envelope_id).encode("ascii")]
    return params


_NOTIFY = b"NOTIFY=FAILURE,DELAY"


def rcpt_parameters(address: str) -> list[bytes]:
    """The RCPT TO parameters of a DSN envelope (RFC 3461 sections 4.1, 4.2): bounces
    and delays are reported, and name the address as given. A non-ASCII address gets no
    ORCPT (its utf-8 address type is RFC 6533's, which few servers take)."""
    if not address.isascii():
        return [_NOTIFY]
    return [_NOTIFY, b"ORCPT=rfc822;" + xtext(address).encode("ascii")]


def _address(address: str, smtputf8: bool) -> bytes:
    """``<address>`` for MAIL/RCPT; UTF-8 only where the session may use SMTPUTF8."""
    if address.isascii():
        return b"<" + address.encode("ascii") + b">"
    if not smtputf8:
        raise ValueError("non-ASCII address without SMTPUTF8")
    return b"<" + address.encode("utf-8") + b">"


def envelope_commands(envelope: Envelope, recipients: tuple[str, ...], smtputf8: bool,
                      params: list[bytes], *, dsn: bool = False) -> list[bytes]:
    """``MAIL FROM`` with ``params`` (from ``mail_parameters``) and one ``RCPT TO`` per
    recipient, each a CRLF-ended command line, for the pipelined and the command path
    alike; with ``dsn`` (the relay offers DSN and the envelope has an id) each RCPT
    carries ``rcpt_parameters``."""
    if not params and not dsn and envelope.all_ascii:  # the usual envelope, in one encode
        return [b"MAIL FROM:<%s>\r\n" % envelope.sender.encode("ascii"),
                *[b"RCPT TO:<%s>\r\n" % address.encode("ascii") for address in recipients]]
    mail = b" ".join([b"MAIL FROM:" + _address(envelope.sender, smtputf8), *params]) if params else (
        b"MAIL FROM:" + _address(envelope.sender, smtputf8))
    if dsn:
        return [mail + b"\r\n", *[b" ".join([b"RCPT TO:" + _address(address, smtputf8), *rcpt_parameters(address)])
                                   + b"\r\n" for address in recipients]]
    return [mail + b"\r\n", *[b"RCPT TO:" + _address(address, smtputf8) + b"\r\n" for address in recipients]]


def bdat_body(content: bytes) -> bytes:
    """The message as ``BDAT`` carries it: an envelope's DATA content without its
    dot-stuffing and without the end-of-data line (RFC 3030 section 2: BDAT data is
    sent as it is, with no transparency)."""
    body = content[: -len(END_OF_DATA)]
    if body.startswith(b".."):  # every line that began with a dot got one more
        body = body[1:]
    if _STUFFED_LINE.search(body):
        body = body.replace(b"\r\n..", b"\r\n.")
    return body


def _checked(code: int, text: str) -> Reply:
    if code == SERVICE_CLOSING:
        # 421 (RFC 5321 section 3.8): the server is closing the channel. A 421 to the
        # end of DATA is a refusal of the message, not an ambiguity.
        raise ConnectionFailed(f"{code} {readable(text)}", code=code, text=readable(text))
    return code, readable(text)


def _data_refused(start: Reply) -> Reply:
    """DATA answered with something else than 354. A positive reply there is a server
    that broke the protocol (aiosmtplib raises SMTPDataError): no content was sent, so
    nothing was delivered, and the session's state is unknown."""
    if is_positive(start[0]):
        raise ConnectionFailed(f"DATA answered {start[0]} {start[1]} instead of 354; no content sent")
    return start


class Transaction:
    """One attempt to send ``envelope`` to ``recipients`` on one connection."""

    __slots__ = ("_clean", "_connection", "_envelope", "_mail", "_params", "_pending", "_pipe", "_rcpt",
                 "_recipients", "_reset_first", "bdat", "outcome")

    def __init__(self, connection: Connection, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        self._connection = connection
        self._envelope = envelope
        self._recipients = recipients
        self._pipe: PipelineProtocol | None = None
        self._pending: asyncio.Future[list[Reply]] | None = None  # the end-of-DATA reply, pipelined
        self._clean = False  # pipelined: MAIL and every RCPT accepted, DATA answered 354
        #: Sent as MAIL, RCPT..., BDAT n LAST and the content, all at once: later
        #: transactions may follow it before its replies.
        self.bdat = False
        self._reset_first = False  # ... after an RSET
        self._mail: Reply = (0, "")
        self._rcpt: list[Reply] = []
        self._params: list[bytes] = []  # MAIL FROM parameters on this session
        self.outcome: Outcome | None = None

    @property
    def open(self) -> bool:
        """The end of DATA (or the BDAT) is on the wire and its reply not yet read."""
        return self._pending is not None

    async def start(self) -> None:
        """Send the transaction; set ``outcome`` unless the end-of-DATA reply is still
        to be read (``open``; pipelined only). Raises only CancelledError, after closing
        the session."""
        conn, envelope, recipients = self._connection, self._envelope, self._recipients
        try:
            if envelope.all_ascii and not (envelope.utf8_headers or envelope.eight_bit or envelope.envelope_id):
                params: list[bytes] | Reply = []  # the usual envelope: nothing to declare, nothing to check
            else:
                params = mail_parameters(envelope, recipients, smtputf8=conn.smtputf8,
                                         eightbitmime=conn.eightbitmime,
                                         dsn=conn.dsn and envelope.envelope_id is not None)
            if isinstance(params, tuple):
                # Nothing is sent: the session stays as it is, the message fails for good.
                self.outcome = Outcome(refused=dict.fromkeys(recipients, params), reply=params)
                return
            self._params = params
            pipe = conn.pipe
            if pipe is not None:
                self._pipe = pipe
                if conn.bdat:
                    self._start_bdat(pipe)
                else:
                    await self._start_pipelined(pipe)
            else:
                client = conn.client
                if client is None:
                    raise ConnectionFailed("not connected")
                self.outcome = await self._command_by_command(client)
        except ConnectionFailed as exc:
            conn.close()
            self.outcome = self._lost(exc)
        except (TimeoutError, SMTPException, OSError) as exc:
            conn.close()
            self.outcome = self._lost(ConnectionFailed(f"connection lost: {exc}"))
        except BaseException:
            # Cancelled or a bug mid-transaction: the session state is unknown, so it goes.
            conn.close()
            raise

    async def finish(self) -> Outcome:
        """Read the end-of-DATA (or BDAT) reply if it is still due; return the outcome."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            assert self._pipe is not None
            try:
                replies = pending.result() if pending.done() else await self._pipe.replies(pending)
                if self.bdat:
                    self.outcome = self._bdat_outcome(replies)
                else:
                    code, text = replies[0]
                    if code == SERVICE_CLOSING:
                        _checked(code, text)  # raises: a 421 is an answer, not an ambiguity
                    if self._clean and 200 <= code < 300:
                        self.outcome = Outcome(accepted=list(self._recipients), delivered=(code, text))
                    else:
                        self.outcome = _outcome(self._recipients, self._mail, self._rcpt, (code, text))
            except ConnectionFailed as exc:
                self._connection.close()
                self.outcome = self._lost(exc, ambiguous=self._ambiguous(exc), unsent=not exc.written)
            except BaseException:
                self._connection.close()
                raise
        assert self.outcome is not None
        return self.outcome

    def _ambiguous(self, exc: ConnectionFailed) -> bool:
        """The end of DATA (or the BDAT) went out and its reply never came: the server may
        have the message. A 421 is an answer; with BDAT, so is a refusal that came before
        the loss, and nothing is ambiguous that was never written."""
        # Called first, whatever the answer: it keeps the recipients refused before the loss.
        could_deliver = self._bdat_partial(exc.replies) if self.bdat and exc.replies else True
        return exc.code is None and (not self.bdat or (exc.written and could_deliver))

    def _bdat_outcome(self, replies: list[Reply]) -> Outcome:
        if self._reset_first:
            reset, replies = replies[0], replies[1:]
            if reset[0] == SERVICE_CLOSING:
                _checked(*reset)  # raises
        mail, rcpt, bdat = replies[0], replies[1:-1], replies[-1]
        self._mail, self._rcpt = mail, rcpt  # kept if a 421 below ends the session
        clean = True
        for code, text in replies:
            if code >= 300:
                if code == SERVICE_CLOSING:
                    _checked(code, text)  # raises: the server closes; nothing after it was taken
                clean = False
        if clean:
            return Outcome(accepted=list(self._recipients), delivered=bdat)
        # RFC 3030 section 2: after a refused BDAT the server's state is undetermined
        # until RSET; the next transaction on this session starts with one.
        self._connection.unclean = True
        willing = is_positive(mail[0]) and any(is_positive(code) for code, _ in rcpt)
        return _outcome(self._recipients, mail, rcpt, bdat if willing else None)

    def _bdat_partial(self, replies: list[Reply]) -> bool:
        """Keep the replies that came before a BDAT transaction's session was lost;
        True unless they already refused the message (then nothing can have been
        delivered, so the loss is not ambiguous)."""
        if self._reset_first:
            replies = replies[1:]
        if not replies:
            return True
        mail, self._rcpt = replies[0], replies[1 : 1 + len(self._recipients)]
        if not is_positive(mail[0]):
            return False
        return not (len(self._rcpt) == len(self._recipients) and not any(is_positive(c) for c, _ in self._rcpt))

    def _lost(self, exc: ConnectionFailed, *, ambiguous: bool | None = None, unsent: bool = False) -> Outcome:
        """The session ended mid-transaction: recipients already refused for good stay
        refused; every other one is retried."""
        outcome = lost(self._recipients, exc, ambiguous=ambiguous, unsent=unsent)
        for address, reply in zip(self._recipients, self._rcpt, strict=False):
            if is_permanent(reply[0]):
                outcome.refused[address] = reply
                del outcome.deferred[address]
        return outcome

    # -- pipelined (RFC 2920) --

    async def _start_pipelined(self, pipe: PipelineProtocol) -> None:
        envelope, recipients, conn = self._envelope, self._recipients, self._connection
        commands = envelope_commands(envelope, recipients, conn.smtputf8, self._params,
                                     dsn=conn.dsn and envelope.envelope_id is not None)
        commands.append(b"DATA\r\n")
        # The pipe's replies are valid Unicode already (decoded with replacement).
        replies = await pipe.replies(pipe.send(b"".join(commands), len(commands)))
        mail, rcpt, start = replies[0], replies[1:-1], replies[-1]
        clean = True
        for index, (code, text) in enumerate(replies):
            if code >= 400:
                if code == SERVICE_CLOSING:
                    # The RCPT replies before the 421 are the server's word (a recipient
                    # refused for good stays refused); none after it is.
                    self._mail, self._rcpt = mail, rcpt[:max(0, index - 1)]
                    _checked(code, text)  # raises
                clean = False
        self._mail, self._rcpt = mail, rcpt
        if clean and start[0] == START_DATA:
            self._clean = True
            # Not flushed here: the next transaction's envelope, or finish(), sends it.
            self._pending = pipe.send(envelope.content, 1)
            return
        willing = is_positive(mail[0]) and any(is_positive(code) for code, _ in rcpt)
        if start[0] != START_DATA:
            await self._reset_pipelined(pipe)
            self.outcome = _outcome(recipients, mail, rcpt, _data_refused(start) if willing else None)
            return
        if not willing:
            # RFC 2920 section 3.1: DATA accepted with no valid recipient; end it with
            # no content and take no delivery from it.
            _checked(*(await pipe.replies(pipe.send(END_OF_DATA, 1)))[0])
            self.outcome = _outcome(recipients, mail, rcpt, None)
            return
        self._pending = pipe.send(envelope.content, 1)

    def _start_bdat(self, pipe: PipelineProtocol) -> None:
        """Queue MAIL, every RCPT and ``BDAT n LAST`` with the content, without waiting
        for any reply (RFC 3030 over RFC 2920): ``finish`` reads all of them, in order."""
        conn = self._connection
        commands = envelope_commands(self._envelope, self._recipients, conn.smtputf8, self._params,
                                     dsn=conn.dsn and self._envelope.envelope_id is not None)
        if conn.unclean or conn.on_the_wire > 1:
            # An earlier transaction's BDAT reply is not in yet, or was a refusal: RFC 3030
            # leaves the server's state undetermined after a refused BDAT until RSET, so a
            # transaction that may follow one begins with RSET.
            commands.insert(0, RSET)
            self._reset_first = True
            conn.unclean = False
        body = bdat_body(self._envelope.content)
        commands.append(b"BDAT %d LAST\r\n" % len(body))
        self.bdat = True
        self._pending = pipe.send(b"".join(commands), len(commands), body)

    async def _reset_pipelined(self, pipe: PipelineProtocol) -> None:
        code, text = _checked(*(await pipe.replies(pipe.send(b"RSET\r\n", 1)))[0])
        if not is_positive(code):
            raise ConnectionFailed(f"RSET refused: {code} {text}", code=code)

    # -- command by command (aiosmtplib) --

    async def _command_by_command(self, client: aiosmtplib.SMTP) -> Outcome:
        envelope, recipients = self._envelope, self._recipients
        conn = self._connection
        mail_line, *rcpt_lines = envelope_commands(envelope, recipients, conn.smtputf8, self._params,
                                                   dsn=conn.dsn and envelope.envelope_id is not None)
        # execute_command joins its arguments and adds CRLF: each line goes as one.
        response = await client.execute_command(mail_line[:-2])
        mail = _checked(response.code, response.message)
        if not is_positive(mail[0]):
            await self._reset(client)
            return _outcome(recipients, mail, [], None)
        rcpt: list[Reply] = []
        self._rcpt = rcpt  # filled as replies come: kept if the session is lost midway
        for line in rcpt_lines:
            response = await client.execute_command(line[:-2])
            rcpt.append(_checked(response.code, response.message))
        if not any(is_positive(code) for code, _ in rcpt):
            await self._reset(client)
            return _outcome(recipients, mail, rcpt, None)
        response = await client.execute_command(b"DATA")
        start = _checked(response.code, response.message)
        if start[0] != START_DATA:
            data = _data_refused(start)
            await self._reset(client)
            return _outcome(recipients, mail, rcpt, data)
        protocol = client.protocol
        if protocol is None:
            raise ConnectionFailed("connection lost before the message content")
        # aiosmtplib's data() would normalise and dot-stuff again; the envelope's
        # content is already wire-ready, so it is written as it is.
        protocol.write(envelope.content)
        try:
            response = await protocol.read_response(timeout=self._connection.options.timeout)
        except (TimeoutError, SMTPException, OSError) as exc:
            raise ConnectionFailed(f"connection lost after the end of DATA: {exc}", ambiguous=True) from exc
        return _outcome(recipients, mail, rcpt, _checked(response.code, response.message))

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        response = await client.execute_command(b"RSET")
        if not is_positive(response.code):
            raise ConnectionFailed(f"RSET refused: {response.code} {readable(response.message)}", code=response.code)
