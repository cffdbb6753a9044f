"""What the gateway's background loops share: one task each, a store outage logged
once, a round that runs early when woken, and a stop that waits for the task to end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from core.errors import GatewayError

log = logging.getLogger("gateway.events")

# While the store fails, rounds back off up to this (and the outage is logged once).
MAX_BACKOFF_SECONDS = 5.0


class Outage:
    """A background loop's store outage: logged when it starts and when it ends, not
    at every round, with rounds spaced out meanwhile."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def failed(self, exc: GatewayError, interval: float) -> float:
        """Note a failed round; how long to wait before the next."""
        self.failures += 1
        if self.failures == 1:
            log.warning("%s paused: %s", self.what, exc.technical_message or exc.message)
        return min(interval * 2.0 ** min(self.failures, 16), MAX_BACKOFF_SECONDS)

    def succeeded(self) -> None:
        if self.failures:
            log.info("%s resumed after %d failed round(s)", self.what, self.failures)
        self.failures = 0


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and return once it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def finish_or_cancel(tasks: Iterable[asyncio.Task[Any]], grace_seconds: float) -> int:
    """Give ``tasks`` ``grace_seconds`` to finish, cancel those still running, and
    return once every one has ended; how many were cancelled."""
    # A copy: their done-callbacks remove them from the caller's set meanwhile.
    pending = set(tasks)
    if not pending:
        return 0
    _, late = await asyncio.wait(pending, timeout=grace_seconds)
    for task in late:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(late)


async def run_guarded(
    run_round: Callable[[], Awaitable[Any]],
    logger: logging.Logger,
    *,
    skipped: str,
    failed: str,
    skipped_level: int = logging.WARNING,
) -> None:
    """One round of a loop that must outlive it: a gateway error (the store or TikTok
    out) is logged at ``skipped_level`` as ``skipped % reason``, any other error with
    its traceback as ``failed``."""
    try:
        await run_round()
    except GatewayError as exc:
        logger.log(skipped_level, skipped, exc.technical_message or exc.message)
    except Exception:
        logger.exception(failed)


class WakeableLoop:
    """Rounds in one background task, every ``_interval()`` seconds or as soon as
    ``wake()`` is called; a subclass names the task and says what a round does."""

    task_name: str
    what: str  # in the outage log lines: "account event relay"
    round_name: str  # in the failed-round log line: "event relay"

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._start()

    def wake(self) -> None:
        """Run the next round now rather than after the interval."""
        self._wake.set()

    def _start(self) -> bool:
        """Start the task unless it runs; whether it was started."""
        if self.running:
            return False
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=self.task_name)
        return True

    def _interval(self) -> float:
        raise NotImplementedError

    async def _round(self) -> bool:
        """One round; whether the next one is due at once."""
        raise NotImplementedError

    async def _run(self) -> None:
        # The flag too, not only cancel(): a driver may turn the cancellation of a call
        # in flight into an error of its own, which the loop would carry on after.
        outage = Outage(self.what)
        while not self._stopping:
            # Cleared before the round: a wake during it triggers the next one.
            self._wake.clear()
            wait, again = self._interval(), False
            try:
                again = await self._round()
                outage.succeeded()
            except GatewayError as exc:
                wait = outage.failed(exc, self._interval())
            except Exception:
                log.exception("%s round failed", self.round_name)
            if again:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
                pass

    async def _stop_task(self) -> bool:
        """Stop the loop; whether it was running."""
        self._stopping = True
        task, self._task = self._task, None
        await cancel_and_wait(task)
        return task is not None
