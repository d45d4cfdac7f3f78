"""Webhooks of asynchronous predictions, sent as Cog sends them.

The prediction's current state is POSTed to its ``webhook`` URL on each event the client
asked for (``webhook_events_filter``, all four by default): ``start`` and ``completed`` at
once, ``output`` and ``logs`` at most once every 500 ms (the latest state then). Sends of
one prediction go out one after another, in order; ``completed`` is tried again a few
times when the receiver fails, the others are sent once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

import aiohttp

logger = logging.getLogger("cog.runtime")

EVENTS = ("start", "output", "logs", "completed")
#: Seconds between two sends of output or logs events.
THROTTLE = 0.5
#: Seconds to wait before each new try of a completed event.
RETRIES = (0.1, 0.5, 2.0)


class Webhook:
    """The webhook of one prediction; ``state()`` gives the prediction's current JSON."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        events: frozenset[str],
        state: Callable[[], dict[str, Any]],
    ) -> None:
        self.session = session
        self.url = url
        self.events = events
        self.state = state
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._sender = asyncio.ensure_future(self._send_all())
        self._last = -THROTTLE
        self._later: asyncio.TimerHandle | None = None

    def event(self, kind: str) -> None:
        """Something happened: send the state now, or (output, logs) within 500 ms."""
        if kind not in self.events:
            return
        loop = asyncio.get_running_loop()
        if kind in ("start", "completed"):
            if self._later is not None:
                self._later.cancel()
                self._later = None
            self._put(kind)
            return
        if self._later is not None:
            return  # a send of the latest state is due already
        wait = self._last + THROTTLE - loop.time()
        if wait <= 0:
            self._put(kind)
        else:
            self._later = loop.call_later(wait, self._put_later, kind)

    def _put_later(self, kind: str) -> None:
        self._later = None
        self._put(kind)

    def _put(self, kind: str) -> None:
        self._last = asyncio.get_running_loop().time()
        body = json.dumps(self.state()).encode()
        self._queue.put_nowait((kind, body))

    async def close(self) -> None:
        """Send what is queued, then stop."""
        if self._later is not None:
            self._later.cancel()
        self._queue.put_nowait(None)
        await self._sender

    async def _send_all(self) -> None:
        while (item := await self._queue.get()) is not None:
            kind, body = item
            tries = RETRIES if kind == "completed" else ()
            for wait in (0.0, *tries):
                if wait:
                    await asyncio.sleep(wait)
                if await self._send(kind, body):
                    break

    async def _send(self, kind: str, body: bytes) -> bool:
        try:
            async with self.session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                if response.status < 300:
                    return True
                logger.warning("webhook %s (%s) answered HTTP %d", self.url, kind, response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.warning("webhook %s (%s) failed: %s", self.url, kind, e or type(e).__name__)
        return False
