"""The HTTP front door: OpenAI-compatible API, Prometheus metrics and a live cluster page.

``create_app(backend)`` serves any ``GenerationBackend`` (the multi-process scheduler, or
``LoopBackend`` over an in-process ``LLM``). See docs/SERVING.md.
"""

from ares_jax.frontend.backend import (
    BackendClosed,
    GenerationBackend,
    LoopBackend,
    Overloaded,
    model_name_for,
)
from ares_jax.frontend.server import HTTPServerThread, create_app, serve_http

__all__ = [
    "BackendClosed",
    "GenerationBackend",
    "HTTPServerThread",
    "LoopBackend",
    "Overloaded",
    "create_app",
    "model_name_for",
    "serve_http",
]
