"""What compat/xinference_api.py patches is still there, in the shape it relies on: the installed
Xinference's own routes (registered as its RESTfulAPI does, without a server) and answer classes."""

import asyncio
import inspect

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter
from sse_starlette.sse import EventSourceResponse
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.testclient import TestClient
from xinference.api.model_request_logging import ModelRequestLoggingRoute
from xinference.api.restful_api import RESTfulAPI
from xinference.api.routers import llm, models

from xinf_llama_vision.api import LAUNCH_PATH
from xinf_llama_vision.compat.xinference_api import wrap_endpoint, wrap_send
from xinf_llama_vision.request import CHECKS

WRAPPED = (*CHECKS, LAUNCH_PATH)


def xinference_router() -> APIRouter:
    """Xinference's chat, completion and model routes, as ``RESTfulAPI`` registers them (auth off)."""
    api = RESTfulAPI.__new__(RESTfulAPI)  # the routes only: no stores, no supervisor
    api._router = APIRouter(route_class=ModelRequestLoggingRoute)
    api._auth_service = api._advanced_auth_service = None
    llm.register_routes(api)
    models.register_routes(api)
    return api._router


def post_route(routes, path) -> APIRoute:
    found = [r for r in routes if isinstance(r, APIRoute) and r.path == path and "POST" in r.methods]
    assert len(found) == 1, (path, found)
    return found[0]


@pytest.mark.parametrize("path", WRAPPED)
def test_the_wrapped_routes_are_api_routes_whose_endpoint_takes_the_request(path):
    route = post_route(xinference_router().routes, path)
    assert "request" in inspect.signature(route.endpoint).parameters
    assert route.dependant.call is route.endpoint  # the two places wrap_endpoint replaces


def test_a_wrapped_endpoint_runs_the_hook_inside_the_route():
    """Wrapped before the router is mounted (Xinference 4 calls configure_api first), and wrapped in
    an app that already has the route."""
    seen = []

    async def hook(path, endpoint, args, kwargs):
        seen.append((path, endpoint.__name__, sorted(kwargs)))
        return JSONResponse({"hooked": path})

    router = xinference_router()
    wrap_endpoint(post_route(router.routes, "/v1/chat/completions"), hook)
    app = FastAPI()
    app.include_router(router)
    wrap_endpoint(post_route(app.router.routes, "/v1/completions"), hook)
    with TestClient(app) as client:
        for path in ("/v1/chat/completions", "/v1/completions"):
            answer = client.post(path, json={"model": "m"})
            assert answer.status_code == 200 and answer.json() == {"hooked": path}, answer.text
    assert seen == [("/v1/chat/completions", "create_chat_completion", ["request"]),
                    ("/v1/completions", "create_completion", ["request"])]


async def chunks():
    yield "data"


@pytest.mark.parametrize("make", [
    lambda: Response(b"{}", media_type="application/json"),
    lambda: JSONResponse({}),
    lambda: StreamingResponse(chunks(), media_type="text/event-stream"),
    lambda: EventSourceResponse(chunks(), ping=600),
], ids=["Response", "JSONResponse", "StreamingResponse", "EventSourceResponse"])
def test_an_answer_keeps_its_class_for_xinference_and_sends_through_the_wrapper(make):
    response = make()
    cls = type(response)
    sent, wrapped = [], []

    def wrap(send):
        async def through(message):
            wrapped.append(message["type"])
            await send(message)
        return through

    async def send(message):
        sent.append(message["type"])

    async def receive():
        await asyncio.Event().wait()  # the client stays

    assert wrap_send(response, wrap) is response and wrap_send(response, None) is response
    assert isinstance(response, cls) and type(response).__name__ == cls.__name__
    streams = (StreamingResponse, EventSourceResponse)  # what Xinference's route class logs as a stream
    assert isinstance(response, streams) == (cls in streams)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST", "headers": []}
    asyncio.run(asyncio.wait_for(response(scope, receive, send), 10))
    assert sent == wrapped and sent[0] == "http.response.start" and sent[-1] == "http.response.body", sent


def test_the_model_scope_check_the_guard_calls():
    """Not a patch: :class:`~xinf_llama_vision.api.guard.Guard` calls Xinference's own check of a key's
    model scope, ``request.app.state.api._check_model_access(request, model, "LLM")``."""
    assert list(inspect.signature(RESTfulAPI._check_model_access).parameters) == [
        "self", "request", "model_uid", "model_type"]
    assert "self._app.state.api = self" in inspect.getsource(RESTfulAPI.serve)
