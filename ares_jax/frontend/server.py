"""The FastAPI app (OpenAI API, health, metrics, cluster JSON, live page) and ways to run it.

``create_app(backend)`` builds the app over any ``GenerationBackend``; ``serve_http`` runs it
with uvicorn in the foreground; ``HTTPServerThread`` runs it on a background thread with a
clean stop (tests, notebooks, a scheduler process that has its own main loop).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ares_jax.frontend.backend import GenerationBackend
from ares_jax.frontend.errors import install_handlers
from ares_jax.frontend.metrics import CONTENT_TYPE, ServerMetrics
from ares_jax.frontend.openai_api import Context, chat_completions, completions
from ares_jax.frontend.protocol import ChatCompletionRequest, CompletionRequest

_STATIC = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}


def _static(name: str) -> str:
    return resources.files("ares_jax.frontend").joinpath("static", name).read_text("utf-8")


def create_app(backend: GenerationBackend, *, served_model_name: str | None = None) -> FastAPI:
    """The HTTP front door over ``backend``; metrics live in the app's own registry
    (``app.state.metrics``), so several apps can share a process."""
    name = served_model_name or backend.model_name
    metrics = ServerMetrics(name, backend.cluster_state)
    ctx = Context(backend=backend, metrics=metrics, served_model_name=name)
    app = FastAPI(title="ares-jax", summary="OpenAI-compatible ARES serving",
                  docs_url="/docs", redoc_url=None)
    app.state.ctx, app.state.metrics, app.state.backend = ctx, metrics, backend
    install_handlers(app)
    started = int(time.time())

    @app.post("/v1/completions")
    async def _completions(body: CompletionRequest, request: Request) -> Response:
        return await completions(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completions(ctx, body, request)

    @app.get("/v1/models")
    async def _models() -> dict:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": started, "owned_by": "ares-jax",
            "root": backend.model_name, "max_model_len": backend.max_model_len}]}

    @app.get("/health")
    async def _health() -> JSONResponse:
        ok, detail = backend.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", **detail},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/cluster")
    async def _cluster() -> JSONResponse:
        state = backend.cluster_state()
        metrics.observe_cluster(state)
        return JSONResponse(state, headers={"Cache-Control": "no-store"})

    @app.get("/", response_class=HTMLResponse)
    async def _page() -> HTMLResponse:
        return HTMLResponse(_static("dashboard.html"))

    @app.get("/static/{filename}")
    async def _asset(filename: str) -> Response:
        if filename not in _STATIC:
            return JSONResponse({"error": {"message": f"no such file: {filename}",
                                           "type": "invalid_request_error", "param": None,
                                           "code": None}}, status_code=404)
        return Response(_static(filename), media_type=_STATIC[filename])

    return app


def _uvicorn_config(app: FastAPI, log_level: str, **kwargs) -> uvicorn.Config:
    # Streams in flight get a few seconds to finish on shutdown, then are cut (and aborted).
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                          lifespan="off", **kwargs)


def serve_http(backend: GenerationBackend, host: str = "127.0.0.1", port: int = 8000, *,
               served_model_name: str | None = None, log_level: str = "info") -> None:
    """Serve in the foreground until interrupted (Ctrl-C / SIGTERM)."""
    app = create_app(backend, served_model_name=served_model_name)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: that is
    # the normal way out of a foreground server, not an error.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(_uvicorn_config(app, log_level, host=host, port=port)).run()


class HTTPServerThread:
    """The app on a background thread: ``with HTTPServerThread(backend) as srv: srv.url``.

    ``port=0`` picks a free port (bound here, before the thread starts, so ``url`` is known
    at once and there is no race for the port)."""

    def __init__(self, backend: GenerationBackend, host: str = "127.0.0.1", port: int = 0, *,
                 served_model_name: str | None = None, log_level: str = "warning") -> None:
        self.app = create_app(backend, served_model_name=served_model_name)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(_uvicorn_config(self.app, log_level))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="ares-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> HTTPServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> HTTPServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
