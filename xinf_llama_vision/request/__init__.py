"""Requests: OpenAI bodies → one checked object, the same in the API process and every engine.

One module a job: :mod:`.messages` (messages → the official prompt, byte for byte), :mod:`.options`
(every OpenAI parameter: honoured or refused), :mod:`.grammar` (``response_format``), :mod:`.policy`
(what a launched model allows), :mod:`.checks` (one :class:`CheckedRequest` per request, and the API
process's body checks) and :mod:`.wire` (every key that travels between the two processes).
"""

from .checks import CHECKS, CheckedRequest, chat_request, completion_request, json_object, request_sampling
from .policy import Policy, launch_int, launch_policy

__all__ = ["CHECKS", "CheckedRequest", "Policy", "chat_request", "completion_request", "json_object",
           "launch_int", "launch_policy", "request_sampling"]
