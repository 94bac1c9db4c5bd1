"""The exceptions a client or an operator can see, in one place (nothing of ours imported here).

Each becomes an HTTP 400 whose message names the problem and the fix. The API process's guard
answers a :class:`RequestError` it finds itself, before Xinference's handler. One found in the
model process (an image it cannot fetch or decode, a prompt too long for the context) comes back
as an answer ``{REFUSAL_KEY: message}`` (:mod:`.request.wire`) instead of an exception, which Xinference would hide
behind a 500 (``engines.common.answer_or_refusal``); the guard turns that answer into the 400.
"""


class RequestError(ValueError):
    """A request this model cannot serve as sent. The message says what to change (HTTP 400)."""


class ImageError(RequestError):
    """An image that cannot be used; the message names it and says why (HTTP 400)."""



class WeightsUnavailable(RuntimeError):
    """The weights of one of our models could not be downloaded; the message says what to do (a launch
    failure, shown by ``xinference launch``; see :mod:`.weights`)."""


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the field."""


class DoesNotFit(RuntimeError):
    """A launch that would run out of GPU memory; the message says what would fit."""


class RequestFailed(RuntimeError):
    """One request failed inside the engine (out of memory, a bug): the message says where, that the
    server's log has the details and that no other request was affected (HTTP 500, or a stream's error
    event; the exception's own text stays in the log, as Xinference keeps worker text from clients)."""

    def __init__(self, where: str, error: BaseException, alone: bool = True):
        others = ", and no other request was affected" if alone else ""
        super().__init__(f"this request failed {where} ({type(error).__name__}); the server's log has the "
                         f"details{others}: send it again")


class RequestLeft(RuntimeError):
    """What a caller still reading a cancelled sequence gets (Xinference's abort of a request)."""
