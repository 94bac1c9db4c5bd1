"""ASGI plumbing for the wrapped routes: a checked body handed to the endpoint, an answer sent
message by message, and a whole answer raced against its client's hang-up."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

from starlette.responses import Response

logger = logging.getLogger("xinf_llama_vision")


async def unless_gone(call: Awaitable[Any], receive) -> Any:
    """``call``'s answer; if the client hangs up first, ``call`` is cancelled (through Xinference's
    actor call, down to the engine, whose rows leave the batch) and the answer is an empty 499.
    ``receive`` is the client's, with the body already read: its next message is the hang-up."""

    async def hang_up() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(call), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    await asyncio.gather(answer, return_exceptions=True)
    logger.info("a client hung up before its answer: the request was cancelled")
    return Response(status_code=499)


def replay(body: bytes, receive):
    """A ``receive`` that yields ``body`` first, then whatever the client sends next."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def respond(send, status: int, body: bytes, headers=()) -> None:
    """Send a whole JSON answer through ``send``."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": body})
