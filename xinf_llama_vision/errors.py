"""The exceptions a client can see, in one place (nothing of ours imported here).

Each becomes an HTTP 400 whose message names the problem and the fix: the API process's guard
answers :class:`RequestError` (and :class:`ImageError`) itself, before Xinference's handler; a
context-length refusal found by the engine travels as Xinference's ``ContextLengthExceeded``
(``engines.common.ContextTooLong``), which Xinference answers with a 400 and the guard rewords.
"""


class RequestError(ValueError):
    """A request this model cannot serve as sent. The message says what to change (HTTP 400)."""


class ImageError(RequestError):
    """An image that cannot be used; the message names it and says why (HTTP 400)."""
