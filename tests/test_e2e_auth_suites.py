"""The load and hostile-input tests once more, with Xinference's default authentication on.

The same test functions as ``test_e2e_concurrency`` and ``test_e2e_hostile`` (imported, so they
cannot drift), against a server of their own with auth on: models launched with the admin's token,
every request sent with an ``xf-`` key (``Server.post`` and ``Server.openai`` carry it).
"""

from __future__ import annotations

import pytest

from test_e2e_auth import Accounts, start
from test_e2e_concurrency import (  # noqa: F401 - fixtures and tests collected here
    expected,
    one_row,
    test_32_concurrent_mixed_requests_equal_raw_transformers,
    test_a_client_that_hangs_up_before_a_whole_answer_leaves_the_batch,
    test_an_abort_by_request_id_ends_the_stream,
    test_clients_that_hang_up_leave_the_batch,
)
from test_e2e_hostile import (  # noqa: F401 - fixtures and tests collected here
    allow_base,
    allow_chat,
    images_server,
    test_hostile_image_is_a_400_naming_the_problem,
    test_model_keeps_serving_the_same_answer_after_hostile_requests,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start(tmp_path_factory, "auth-suites")
    accounts = Accounts(srv)
    srv.admin_token, srv.api_key = accounts.admin, accounts.key
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def launched(server, tiny_checkpoint):
    uids: dict = {}

    def launch(model_name: str, *extra: str) -> str:
        key = (model_name, extra)
        if key not in uids:
            uids[key] = server.launch(model_name, f"auth-{len(uids)}", tiny_checkpoint, *extra)
        return uids[key]

    return launch


@pytest.fixture(scope="module")
def chat_uid(launched):
    return launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--max_images", "2")


def test_requests_here_carry_a_key(server):
    """Without its key the same request is Xinference's 401: the suites above ran with auth on."""
    key, server.api_key = server.api_key, None
    try:
        assert server.post("/v1/chat/completions", {"model": "auth-0", "messages": []})[0] == 401
    finally:
        server.api_key = key
