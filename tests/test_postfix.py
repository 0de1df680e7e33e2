"""The pool against a real Postfix smtpd (tests/postfixserver.py, everything discarded)."""

from __future__ import annotations

import asyncio

from conftest import make_message
from postfixserver import Postfix

from pool import SMTPPool


async def test_real_postfix_takes_every_message_once_over_pipelined_sessions(discarding_postfix: Postfix) -> None:
    postfix = discarding_postfix
    async with SMTPPool("127.0.0.1", postfix.port, size=2, max_attempts=1, pipeline_depth=1) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(30)))
        assert all(slot.connection.pipelined for slot in pool._slots if slot.connection.is_connected)
    assert [r.accepted for r in results] == [[f"rcpt{i}@example.net"] for i in range(30)]
    await postfix.until(lambda: sum(postfix.discarded().values()) >= 30 and len(postfix.sessions()) >= 2,
                        "30 messages discarded and 2 sessions ended")
    assert postfix.discarded() == {f"rcpt{i}@example.net": 1 for i in range(30)}
    sessions = postfix.sessions()
    assert sum(s.get("mail", 0) for s in sessions) == 30 and sum(s.get("data", 0) for s in sessions) == 30
