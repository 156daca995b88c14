"""Records <-> protobuf messages, one pair of functions per record (``*_to_pb``/``*_from_pb``).

The replica boundary's records (``ares_jax/replica/types.py``) are plain data by design, so
each maps one to one onto a message of ``protos/ares.proto``.

Decoding validates: a message that maps onto no valid record (an empty request id, negative
token ids or page counts, a KV block whose chunks do not add up, a ticket that is not one)
raises ``InvalidMessage`` naming the field, which the servers answer ``INVALID_ARGUMENT``
(``serving/validation.py``), before anything is allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ares_jax.engine.sampling import SamplingParams, TokenInfo
from ares_jax.engine.slots import DecodeLoad
from ares_jax.engine.types import Request
from ares_jax.replica.types import (
    Detached,
    Event,
    ImportDone,
    InsertDone,
    KvBlock,
    Prefilled,
    PrefillFailed,
    Stepped,
)
from ares_jax.serving import ares_pb2 as pb

_NAN = float("nan")
MAX_ID_CHARS = 256  # a request id longer than this is refused


class InvalidMessage(ValueError):
    """A message that decodes to no valid record; the message names the field."""


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise InvalidMessage(f"{field} {why}")


def check_request_id(rid: str, field: str = "request_id") -> None:
    _check(bool(rid), field, "must not be empty")
    _check(len(rid) <= MAX_ID_CHARS, field, f"is {len(rid)} characters; at most {MAX_ID_CHARS}")


def _check_token_ids(ids: Sequence[int], field: str) -> None:
    bad = [t for t in ids if t < 0]
    _check(not bad, field, f"has negative token ids {bad[:5]}")

# ---------------------------------------------------------------- requests


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                            max_tokens=p.max_tokens, min_tokens=p.min_tokens, stop=list(p.stop),
                            stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def params_from_pb(m: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the parameter, as ``SamplingParams`` does."""
    _check_token_ids(m.stop_token_ids, "SamplingParams.stop_token_ids")
    return SamplingParams(
        temperature=float(m.temperature), top_p=float(m.top_p), top_k=int(m.top_k),
        seed=int(m.seed) if m.HasField("seed") else None, max_tokens=int(m.max_tokens),
        min_tokens=int(m.min_tokens), stop=tuple(m.stop),
        stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos,
        logprobs=int(m.logprobs) if m.HasField("logprobs") else None)


def request_to_pb(r: Request) -> pb.Request:
    return pb.Request(request_id=r.request_id, prompt_ids=r.prompt_ids,
                      params=params_to_pb(r.params), index=r.index,
                      resumed_ids=r.resumed_ids)


def request_from_pb(m: pb.Request) -> Request:
    check_request_id(m.request_id, "Request.request_id")
    _check(len(m.prompt_ids) > 0, "Request.prompt_ids", "must not be empty")
    _check_token_ids(m.prompt_ids, "Request.prompt_ids")
    _check_token_ids(m.resumed_ids, "Request.resumed_ids")
    try:
        params_from_pb(m.params)
    except InvalidMessage:
        raise
    except ValueError as err:
        raise InvalidMessage(f"Request.params: {err}") from None
    return Request(request_id=m.request_id, prompt_ids=list(m.prompt_ids),
                   params=params_from_pb(m.params), index=m.index,
                   resumed_ids=list(m.resumed_ids))


def token_to_pb(t: TokenInfo) -> pb.TokenInfo:
    msg = pb.TokenInfo(token_id=t.token_id, top_logprobs=t.top_logprobs or {})
    if t.logprob is not None:
        msg.logprob = t.logprob
    return msg


def token_from_pb(m: pb.TokenInfo) -> TokenInfo:
    return TokenInfo(token_id=m.token_id,
                     logprob=float(m.logprob) if m.HasField("logprob") else None,
                     top_logprobs=dict(m.top_logprobs) if m.top_logprobs else None)


# ---------------------------------------------------------------- loads and blocks


def load_to_pb(replica_id: int, ld: DecodeLoad) -> pb.Load:
    return pb.Load(replica_id=replica_id, free_pages=ld.free_pages, used_pages=ld.used_pages,
                   capacity_pages=ld.capacity_pages, reserved_pages=ld.reserved_pages,
                   free_slots=ld.free_slots, request_ids=ld.request_ids,
                   kv_tokens=ld.kv_tokens.tolist(), generated=ld.generated.tolist(),
                   max_tokens=ld.max_tokens.tolist(),
                   predicted_remaining=ld.predicted_remaining.tolist())


def load_from_pb(m: pb.Load) -> DecodeLoad:
    return DecodeLoad(free_pages=m.free_pages, used_pages=m.used_pages,
                      capacity_pages=m.capacity_pages, reserved_pages=m.reserved_pages,
                      free_slots=m.free_slots, request_ids=tuple(m.request_ids),
                      kv_tokens=np.asarray(m.kv_tokens, np.int64),
                      generated=np.asarray(m.generated, np.int64),
                      max_tokens=np.asarray(m.max_tokens, np.int64),
                      predicted_remaining=np.asarray(m.predicted_remaining, np.float64))


def block_to_pb(b: KvBlock) -> pb.KvBlock:
    return pb.KvBlock(source=b.source, request_id=b.request_id, pages=b.pages, nbytes=b.nbytes,
                      tickets=list(b.tickets), chunk_pages=list(b.chunk_pages), start=b.start)


def block_from_pb(m: pb.KvBlock, layout: KvLayout | None = None) -> KvBlock:
    """Checks the page counts add up; with ``layout`` (the receiving pool's), also that each
    ticket is a KV ticket of its page shape and dtype."""
    check_request_id(m.request_id, "KvBlock.request_id")
    _check(m.pages >= 0, "KvBlock.pages", f"must be >= 0, got {m.pages}")
    _check(m.start >= 0, "KvBlock.start", f"must be >= 0, got {m.start}")
    _check(m.nbytes >= 0, "KvBlock.nbytes", f"must be >= 0, got {m.nbytes}")
    if m.tickets or m.chunk_pages:
        _check(len(m.tickets) == len(m.chunk_pages), "KvBlock.tickets",
               f"has {len(m.tickets)} tickets for {len(m.chunk_pages)} chunks")
        _check(all(n >= 1 for n in m.chunk_pages), "KvBlock.chunk_pages",
               f"must be >= 1 each, got {list(m.chunk_pages)[:8]}")
        _check(sum(m.chunk_pages) == m.pages, "KvBlock.chunk_pages",
               f"add up to {sum(m.chunk_pages)} pages; the block has {m.pages}")
        for i, (raw, n) in enumerate(zip(m.tickets, m.chunk_pages)):
            if layout is not None:  # at the receiving replica's door, not in transit
                _check_ticket(raw, n, f"KvBlock.tickets[{i}]", layout)
    return KvBlock(source=m.source, request_id=m.request_id, pages=m.pages, nbytes=m.nbytes,
                   tickets=tuple(m.tickets), chunk_pages=tuple(m.chunk_pages), start=m.start)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KvLayout:
    """A KV pool's page layout: a block of n pages is [layers, >= n, page_size, kv_heads,
    head_dim] of ``dtype`` (K and V alike; the page axis may be padded to a bucket)."""

    layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of(cls, cfg, page_size: int) -> KvLayout:
        """From a model ``Config`` and the engine's page size."""
        return cls(layers=cfg.n_layers, page_size=page_size, kv_heads=cfg.n_kv_heads,
                   head_dim=cfg.head_dim, dtype=str(cfg.jnp_dtype))


def _check_ticket(raw: bytes, pages: int, field: str, layout: KvLayout) -> None:
    import jax.numpy as jnp

    from ares_jax.transfer.kv_transport import KvTicket

    try:
        t = KvTicket.from_bytes(raw)
        shape = tuple(int(d) for d in t.shape)
        dtype = str(jnp.dtype(t.dtype))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise InvalidMessage(f"{field} is not a KV ticket ({type(err).__name__}: "
                             f"{str(err)[:200]})") from None
    _check(len(shape) == 5 and all(d >= 1 for d in shape), field,
           f"has shape {shape}; a page block is [layers, pages, page_size, kv_heads, "
           "head_dim]")
    _check(shape[1] >= pages, field, f"holds {shape[1]} pages; its chunk has {pages}")
    want = (layout.layers, layout.page_size, layout.kv_heads, layout.head_dim)
    got = (shape[0], *shape[2:])
    _check(got == want, field, f"has pages of shape {got} (layers, page_size, kv_heads, "
           f"head_dim); this pool's are {want}")
    _check(dtype == layout.dtype, field, f"has dtype {dtype}; this pool's is {layout.dtype}")


def detached_to_pb(d: Detached) -> pb.Detached:
    return pb.Detached(request_id=d.request_id, num_cached=d.num_cached,
                       last_token=d.last_token, generated=d.generated,
                       predicted_remaining=d.predicted_remaining)


def detached_from_pb(m: pb.Detached) -> Detached:
    check_request_id(m.request_id, "Detached.request_id")
    _check(m.num_cached >= 1, "Detached.num_cached", f"must be >= 1, got {m.num_cached}")
    _check(m.generated >= 0, "Detached.generated", f"must be >= 0, got {m.generated}")
    _check(m.last_token >= 0, "Detached.last_token", f"must be >= 0, got {m.last_token}")
    return Detached(request_id=m.request_id, num_cached=m.num_cached, last_token=m.last_token,
                    generated=m.generated, predicted_remaining=m.predicted_remaining)


def prefilled_to_pb(p: Prefilled) -> pb.Prefilled:
    msg = pb.Prefilled(replica_id=p.replica_id, request_id=p.request_id,
                       first=token_to_pb(p.first), num_tokens=p.num_tokens,
                       finish_reason=p.finish_reason or "", elapsed_s=p.elapsed_s)
    if p.predicted_remaining is not None:
        msg.predicted_remaining = p.predicted_remaining
    if p.stop_reason is not None:
        msg.stop_reason = p.stop_reason
    if p.kv is not None:
        msg.kv.CopyFrom(block_to_pb(p.kv))
    return msg


def prefilled_from_pb(m: pb.Prefilled, layout: KvLayout | None = None) -> Prefilled:
    check_request_id(m.request_id, "Prefilled.request_id")
    _check(m.num_tokens >= 1, "Prefilled.num_tokens", f"must be >= 1, got {m.num_tokens}")
    _check(m.first.token_id >= 0, "Prefilled.first.token_id",
           f"must be >= 0, got {m.first.token_id}")
    kv = block_from_pb(m.kv, layout) if m.HasField("kv") else None
    return Prefilled(
        replica_id=m.replica_id, request_id=m.request_id, first=token_from_pb(m.first),
        num_tokens=m.num_tokens,
        predicted_remaining=float(m.predicted_remaining)
        if m.HasField("predicted_remaining") else None,
        finish_reason=m.finish_reason or None,
        stop_reason=int(m.stop_reason) if m.HasField("stop_reason") else None,
        kv=kv, elapsed_s=m.elapsed_s)


# ---------------------------------------------------------------- events


def event_to_pb(ev: Event, load: DecodeLoad | None = None) -> pb.ReplicaEvent:
    if isinstance(ev, Stepped):
        msg = pb.StepBatch(
            replica_id=ev.replica_id, request_ids=ev.request_ids,
            finish_reasons=[f or "" for f in ev.finish_reasons],
            stop_reasons=[-1 if s is None else s for s in ev.stop_reasons],
            predicted_remaining=[] if ev.predicted_remaining is None
            else ev.predicted_remaining.tolist(),
            preempted=ev.preempted, elapsed_s=ev.elapsed_s, kv_tokens=ev.kv_tokens)
        _tokens_to_pb(ev.tokens, msg)
        if load is not None:
            msg.load.CopyFrom(load_to_pb(ev.replica_id, load))
        return pb.ReplicaEvent(stepped=msg)
    if isinstance(ev, Prefilled):
        return pb.ReplicaEvent(prefilled=prefilled_to_pb(ev))
    if isinstance(ev, InsertDone):
        return pb.ReplicaEvent(insert_done=pb.InsertDone(
            replica_id=ev.replica_id, request_id=ev.request_id, ok=ev.ok, error=ev.error))
    if isinstance(ev, ImportDone):
        return pb.ReplicaEvent(import_done=pb.ImportDone(
            replica_id=ev.replica_id, request_id=ev.request_id, start=ev.start,
            pages=ev.pages, nbytes=ev.nbytes, ok=ev.ok, error=ev.error))
    if isinstance(ev, PrefillFailed):
        return pb.ReplicaEvent(prefill_failed=pb.PrefillFailed(
            replica_id=ev.replica_id, request_ids=ev.request_ids, error=ev.error))
    raise TypeError(f"no wire form for {type(ev).__name__}")


def event_from_pb(m: pb.ReplicaEvent) -> tuple[Event, DecodeLoad | None]:
    """The event, and the load that came with it (step batches carry one)."""
    kind = m.WhichOneof("event")
    if kind == "stepped":
        s = m.stepped
        ev = Stepped(
            replica_id=s.replica_id, request_ids=tuple(s.request_ids),
            tokens=_tokens_from_pb(s),
            finish_reasons=tuple([f or None for f in s.finish_reasons]),
            stop_reasons=tuple([None if x < 0 else x for x in s.stop_reasons]),
            predicted_remaining=np.asarray(s.predicted_remaining, np.float64)
            if len(s.predicted_remaining) else None,
            preempted=tuple(s.preempted), elapsed_s=s.elapsed_s, kv_tokens=s.kv_tokens)
        return ev, load_from_pb(s.load) if s.HasField("load") else None
    if kind == "prefilled":
        return prefilled_from_pb(m.prefilled), None
    if kind == "insert_done":
        d = m.insert_done
        return InsertDone(replica_id=d.replica_id, request_id=d.request_id, ok=d.ok,
                          error=d.error), None
    if kind == "import_done":
        d = m.import_done
        return ImportDone(replica_id=d.replica_id, request_id=d.request_id, start=d.start,
                          pages=d.pages, nbytes=d.nbytes, ok=d.ok, error=d.error), None
    if kind == "prefill_failed":
        d = m.prefill_failed
        return PrefillFailed(replica_id=d.replica_id, request_ids=tuple(d.request_ids),
                             error=d.error), None
    raise ValueError(f"unknown replica event {kind!r}")


def _tokens_to_pb(tokens: Sequence[TokenInfo], msg: pb.StepBatch) -> None:
    """A step's tokens as packed columns (two repeated scalars, no message per row), or as
    ``TokenInfo`` messages when some row carries top logprobs."""
    if any(t.top_logprobs for t in tokens):
        msg.tokens.extend(token_to_pb(t) for t in tokens)
        return
    msg.token_ids.extend([t.token_id for t in tokens])
    msg.logprobs.extend([_NAN if t.logprob is None else t.logprob for t in tokens])


def _tokens_from_pb(s: pb.StepBatch) -> tuple[TokenInfo, ...]:
    """One ``TokenInfo`` per row from either wire form; the packed form costs one small
    object per row and no message parsing."""
    if s.tokens:
        return tuple([token_from_pb(t) for t in s.tokens])
    lps = s.logprobs
    if len(lps) != len(s.token_ids):  # a producer that sent no logprob column
        return tuple([TokenInfo(t) for t in s.token_ids])
    if len(lps) and not any(x != x for x in lps):  # NaN != NaN: a row without a logprob
        return tuple(map(TokenInfo, s.token_ids, lps))
    return tuple([TokenInfo(t, None if lp != lp else lp)
                  for t, lp in zip(s.token_ids, lps)])
