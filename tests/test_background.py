"""services.background's helpers the background loops share."""

from __future__ import annotations

import asyncio

import pytest

from services.background import finish_or_cancel

gen_test = pytest.mark.gen_test(timeout=10)


@gen_test
async def test_finish_or_cancel_lets_the_quick_finish_and_cancels_the_late():
    quick = asyncio.create_task(asyncio.sleep(0))
    late = asyncio.create_task(asyncio.sleep(60))
    tasks = {quick, late}
    # As the loops' sets do: a task leaves the caller's set once it is done.
    for task in tasks.copy():
        task.add_done_callback(tasks.discard)

    assert await finish_or_cancel(tasks, 0.05) == 1

    assert quick.done() and not quick.cancelled()
    assert late.cancelled()
    assert tasks == set()


@gen_test
async def test_finish_or_cancel_with_nothing_in_flight():
    assert await finish_or_cancel(set(), 0.05) == 0


@gen_test
async def test_finish_or_cancel_waits_for_a_failed_task_without_raising():
    async def fail() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fail())

    assert await finish_or_cancel([failed], 1.0) == 0
    assert isinstance(failed.exception(), RuntimeError)
