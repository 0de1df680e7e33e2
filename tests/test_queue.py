"""The pool's queue of jobs (pool/queue.py): bounded for new jobs, never for jobs
coming back, FIFO, and cancel-safe for the getters and putters waiting on it."""

from __future__ import annotations

import asyncio

import pytest

from pool.envelope import prepare
from pool.queue import JobQueue
from pool.slot import Job

pytestmark = pytest.mark.timeout(10)


def job(n: int) -> Job:
    envelope = prepare(b"Subject: x\r\n\r\nhi\r\n", sender="a@example.org", recipients=[f"r{n}@example.net"])
    return Job(envelope, asyncio.get_running_loop().create_future(), 0.0, envelope.recipients)


async def test_new_jobs_wait_for_room_and_jobs_coming_back_never_do() -> None:
    queue = JobQueue(2)
    a, b, c, back = job(1), job(2), job(3), job(4)
    queue.put_nowait(a)
    queue.put_nowait(b)
    assert queue.full() and len(queue) == 2
    waiting = asyncio.ensure_future(queue.put(c))
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_back(back)  # the line is full: it goes ahead of the new ones
    assert len(queue) == 3
    assert queue.take() is back
    assert not waiting.done()  # taking a job that came back frees no room in the line
    assert queue.take() is a
    await asyncio.wait_for(waiting, 1)
    assert [queue.take(), queue.take()] == [b, c] and not queue


async def test_a_cancelled_getter_takes_nothing_and_hands_its_wake_up_on() -> None:
    queue = JobQueue(5)
    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(one := job(1))  # wakes the first getter...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) is one
    assert first.cancelled() and not queue


async def test_drain_empties_the_queue_and_lets_waiting_putters_in() -> None:
    queue = JobQueue(1)
    queue.put_nowait(a := job(1))
    queue.put_back(b := job(2))
    putter = asyncio.ensure_future(queue.put(c := job(3)))
    await asyncio.sleep(0)
    assert queue.drain() == [b, a] and not queue
    await asyncio.wait_for(putter, 1)
    assert queue.take() is c
