"""Refusing malformed messages at a replica process's door, before its handlers run.

``ValidatingInterceptor`` decodes every incoming command with ``codec``'s validating decoders
(and checks KV tickets against the process's own pool layout): a message that maps onto no
valid record is answered ``INVALID_ARGUMENT`` naming the field, so a handler never allocates
pages, pulls from a bogus address or writes a block of the wrong shape. In a ``Commands``
batch each bad command gets its own failed ``Ack`` (``"INVALID_ARGUMENT: ..."``) and the good
ones still run, in order. A replica id the process does not host is ``NOT_FOUND``.

The scheduler's ``Generate`` validates through ``check_generate`` (and the core's own checks).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import codec
from ares_jax.serving.codec import InvalidMessage, KvLayout, _check, check_request_id

MAX_RESERVE_PAGES = 1 << 24


def check_generate(m: pb.GenerateRequest) -> None:
    """What the scheduler checks of a ``GenerateRequest`` before the core's own checks (token
    ids against the vocabulary, lengths against the context)."""
    if m.request_id:
        check_request_id(m.request_id, "GenerateRequest.request_id")
    bad = [t for t in m.prompt_ids if t < 0]
    _check(not bad, "GenerateRequest.prompt_ids", f"has negative token ids {bad[:5]}")
    for i, msg in enumerate(m.messages):
        _check(bool(msg.role), f"GenerateRequest.messages[{i}].role", "must not be empty")


def check_command(msg, layout: KvLayout | None) -> None:
    """Raise InvalidMessage if ``msg`` (a Replica service request) decodes to no valid
    command."""
    if isinstance(msg, pb.PrefillRequest):
        _check(len(msg.requests) > 0, "PrefillRequest.requests", "must not be empty")
        for r in msg.requests:
            codec.request_from_pb(r)
    elif isinstance(msg, pb.InsertRequest):
        req = codec.request_from_pb(msg.request)
        _check(msg.HasField("prefilled"), "InsertRequest.prefilled", "is missing")
        done = codec.prefilled_from_pb(msg.prefilled, layout)
        _check(done.request_id == req.request_id, "InsertRequest.prefilled.request_id",
               f"is {done.request_id!r}; the request is {req.request_id!r}")
        _check(done.kv is not None, "InsertRequest.prefilled.kv", "is missing")
    elif isinstance(msg, pb.RequestRef):
        check_request_id(msg.request_id, "RequestRef.request_id")
    elif isinstance(msg, pb.ReserveRequest):
        check_request_id(msg.request_id, "ReserveRequest.request_id")
        _check(0 <= msg.pages <= MAX_RESERVE_PAGES, "ReserveRequest.pages",
               f"must be in [0, {MAX_RESERVE_PAGES}], got {msg.pages}")
    elif isinstance(msg, pb.ExportRequest):
        check_request_id(msg.request_id, "ExportRequest.request_id")
        _check(0 <= msg.start <= msg.end, "ExportRequest",
               f"needs 0 <= start <= end, got start={msg.start} end={msg.end}")
    elif isinstance(msg, pb.ImportRequest):
        check_request_id(msg.request_id, "ImportRequest.request_id")
        _check(msg.start >= 0, "ImportRequest.start", f"must be >= 0, got {msg.start}")
        block = codec.block_from_pb(msg.block, layout)
        _check(block.request_id == msg.request_id, "ImportRequest.block.request_id",
               f"is {block.request_id!r}; the import is for {msg.request_id!r}")
    elif isinstance(msg, pb.AdoptRequest):
        req = codec.request_from_pb(msg.request)
        state = codec.detached_from_pb(msg.state)
        _check(state.request_id == req.request_id, "AdoptRequest.state.request_id",
               f"is {state.request_id!r}; the request is {req.request_id!r}")


class ValidatingInterceptor(grpc.ServerInterceptor):
    """Validates every unary request of the Replica service (see the module docstring)."""

    def __init__(self, layout: KvLayout | None = None) -> None:
        self.layout = layout

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # the Events stream takes no input worth checking
        inner = handler.unary_unary
        method = handler_call_details.method
        if method.endswith("/GetLoad"):  # names only a replica: nothing to screen
            return handler
        batch = method.endswith("/Commands")
        return grpc.unary_unary_rpc_method_handler(
            self._batch(inner) if batch else self._unary(inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, inner: Callable) -> Callable:
        def behavior(request, context):
            try:
                check_command(request, self.layout)
                return inner(request, context)
            except InvalidMessage as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            except KeyError as err:  # e.g. a replica id this process does not host
                context.abort(grpc.StatusCode.NOT_FOUND, str(err.args[0] if err.args else err))

        return behavior

    def _batch(self, inner: Callable) -> Callable:
        def behavior(request: pb.CommandBatch, context) -> pb.CommandAcks:
            acks: list[pb.Ack | None] = []
            good = pb.CommandBatch()
            for cmd in request.commands:
                kind = cmd.WhichOneof("command")
                try:
                    _check(kind is not None, "Command", "is empty")
                    check_command(getattr(cmd, kind), self.layout)
                except InvalidMessage as err:
                    acks.append(pb.Ack(ok=False, error=f"INVALID_ARGUMENT: {err}"))
                    continue
                acks.append(None)
                good.commands.append(cmd)
            ran = iter(inner(good, context).acks if good.commands else ())
            return pb.CommandAcks(acks=[a if a is not None else next(ran) for a in acks])

        return behavior
