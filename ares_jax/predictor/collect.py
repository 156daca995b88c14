"""Data collection on the real engine: run prompts through the serving loop and record hidden
states every k generated tokens (``ares-jax predictor collect``).

The prefill's last-token hidden state gives the t = 0 point; an ``on_step`` hook gives the
others. Only the rows being recorded are copied off the device. Finished requests are written in
shards of whole requests; a rerun skips requests already in a shard (resumable).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from ares_jax.cluster.local import ServingLoop
from ares_jax.config import to_dict
from ares_jax.datasets import humaneval_prompts, sharegpt_first_turns
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, PrefillResult, Request, StepOutput
from ares_jax.model.loader import LoadedModel
from ares_jax.predictor import data as fmt
from ares_jax.predictor.config import CollectConfig

PromptSpec = tuple[int, str, list[int]]  # (dataset index, source, prompt token ids)
# Config fields a resumed run may change: how much to collect and how the engine is sized.
RESUMABLE_FIELDS = ("num_requests", "requests_per_shard", "max_num_seqs", "num_pages")


def build_prompts(cfg: CollectConfig, tokenizer) -> list[PromptSpec]:
    """The request list, deterministic for a seed: all HumanEval prompts (164) plus the first
    ShareGPT turns that fit ``max_prompt_tokens``, shuffled so a partial run is a fair mix."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user",
                                                                "content": text}]))

    specs: list[tuple[str, list[int]]] = []
    if cfg.include_humaneval:
        specs += [("humaneval", ids) for ids in map(encode, humaneval_prompts())
                  if len(ids) <= cfg.max_prompt_tokens]
    specs = specs[: cfg.num_requests]
    for text in sharegpt_first_turns():
        if len(specs) >= cfg.num_requests:
            break
        ids = encode(text)
        if len(ids) <= cfg.max_prompt_tokens:
            specs.append(("sharegpt", ids))
    # The index is the position in the unshuffled list, so it names the same prompt when a
    # resumed run asks for more requests; only the processing order is shuffled.
    order = np.random.default_rng(cfg.seed).permutation(len(specs))
    return [(int(j), specs[j][0], specs[j][1]) for j in order]


class _RecordingPrefill(PrefillEngine):
    """A prefill engine that also hands each fresh request's last-token hidden states (t = 0)
    to the collector."""

    def __init__(self, model: LoadedModel, config: EngineConfig, collector: Collector) -> None:
        super().__init__(model, config)
        self._collector = collector

    def prefill(self, requests: Sequence[Request]) -> list[PrefillResult]:
        results = super().prefill(requests)
        fresh = [r for r in results if not r.request.resumed_ids]  # recomputes: t != 0
        if fresh:
            hidden, tap = jax.device_get(([r.hidden for r in fresh], [r.hidden_tap for r in fresh]))
            for r, h, ht in zip(fresh, hidden, tap):
                self._collector.record(r.request.request_id, 0, h, ht)
        return results


@contextlib.contextmanager
def _interrupt_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into KeyboardInterrupt while collecting. A job started with
    ``nohup ... &`` inherits an *ignored* SIGINT, so Python's default handler is not enough."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Collector:
    def __init__(self, model: LoadedModel, cfg: CollectConfig, out_dir: str | Path) -> None:
        self.model = model
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.engine_config = EngineConfig(max_num_seqs=cfg.max_num_seqs, num_pages=cfg.num_pages,
                                          tap_layer=cfg.tap_layer)
        self.prefill = _RecordingPrefill(model, self.engine_config, self)
        self.decode = DecodeEngine(model, self.engine_config)
        self.loop = ServingLoop(self.prefill, [self.decode], model.tokenizer)
        self.loop.on_step.append(self._on_step)
        self._points: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}

    def record(self, rid: str, t: int, hidden: np.ndarray, tap: np.ndarray) -> None:
        self._points.setdefault(rid, []).append((t, hidden.astype(np.float16),
                                                 tap.astype(np.float16)))

    def _generated_before_step(self, rid: str) -> int:
        # The loop has already appended this step's sampled token, so the token that was fed
        # (whose hidden state this is) makes ``len - 1`` tokens generated so far.
        tracker = self.loop.trackers.get(rid) or self.loop.finished[rid]
        return len(tracker.token_ids) - 1

    def _on_step(self, engine_index: int, out: StepOutput) -> None:
        k = self.cfg.record_every
        rows, ts = [], []
        for row, rid in enumerate(out.request_ids):
            t = self._generated_before_step(rid)
            if t > 0 and t % k == 0:
                rows.append(row)
                ts.append(t)
        if not rows:
            return
        take = np.asarray(rows, np.int32)
        hidden, tap = jax.device_get((out.hidden[take], out.hidden_tap[take]))
        for i, row in enumerate(rows):
            self.record(out.request_ids[row], ts[i], hidden[i], tap[i])

    # ------------------------------------------------------------------ the run

    def _check_manifest(self, manifest: dict) -> None:
        if not manifest:
            return
        # Only the fields that define the data must match; sizes and sharding may change.
        old = {k: v for k, v in manifest.get("config", {}).items() if k not in RESUMABLE_FIELDS}
        new = {k: v for k, v in to_dict(self.cfg).items() if k not in RESUMABLE_FIELDS}
        if old != new:
            raise ValueError(f"{self.out_dir}: existing collection used a different config "
                             f"{old}; resume with the same settings or use a new directory")

    def run(self, progress: bool = True, prompts: list[PromptSpec] | None = None) -> dict:
        """Collect until every prompt is in a shard. ``prompts`` overrides the ShareGPT +
        HumanEval list (tests use synthetic token ids)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = fmt.read_manifest(self.out_dir)
        self._check_manifest(manifest)
        manifest.pop("interrupted", None)
        shards = list(manifest.get("shards", []))
        done = set()
        for s in shards:
            done.update(np.load(self.out_dir / s["file"])["index"].tolist())
        if prompts is None and self.model.tokenizer is None:
            raise ValueError("collection needs a model with a tokenizer and chat template")
        specs = prompts if prompts is not None else build_prompts(self.cfg, self.model.tokenizer)
        todo = [s for s in specs if s[0] not in done]
        params = SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                max_tokens=self.cfg.max_tokens)
        source = {}
        for index, src, ids in todo:
            rid = str(index)
            source[rid] = (index, src)
            self.loop.add_request(Request(request_id=rid, prompt_ids=ids, params=params,
                                          index=index))
        stats = dict(manifest.get("stats", {}))
        clock = [time.perf_counter()]  # wall time is accumulated across resumed runs
        buffer: list[fmt.RequestRecord] = []

        def flush() -> None:
            if not buffer:
                return
            name = f"shard-{len(shards):05d}.npz"
            fmt.write_shard(self.out_dir / name, buffer, self.model.cfg.d_model)
            shards.append({"file": name, "num_requests": len(buffer),
                           "num_samples": sum(len(r.t) for r in buffer)})
            now = time.perf_counter()
            stats["elapsed_s"] = stats.get("elapsed_s", 0.0) + now - clock[0]
            clock[0] = now
            manifest.update(self._manifest_header(), shards=shards,
                            stats=self._summary(shards, stats))
            fmt.write_manifest(self.out_dir, manifest)
            buffer.clear()

        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="collect",
                   unit="req", disable=not progress)
        try:
            with _interrupt_on_signals():
                while self.loop.has_work:
                    for ev in self.loop.step():
                        if not ev.finished:
                            continue
                        buffer.append(self._finished_record(ev.request_id, *source[ev.request_id]))
                        bar.update(1)
                        if len(buffer) >= self.cfg.requests_per_shard:
                            flush()
        except KeyboardInterrupt:
            # Stopping early (Ctrl-C / kill -INT) keeps every finished request; the ones still
            # running are redone by the next run.
            manifest["interrupted"] = True
        finally:
            bar.close()
        flush()
        return manifest

    def _finished_record(self, rid: str, index: int, source: str) -> fmt.RequestRecord:
        tracker = self.loop.finished.pop(rid)
        points = sorted(self._points.pop(rid, []), key=lambda p: p[0])
        return fmt.RequestRecord(
            index=index, source=source, prompt_ids=list(tracker.request.prompt_ids),
            output_ids=list(tracker.token_ids), finish_reason=tracker.finish_reason,
            max_tokens=self.cfg.max_tokens, t=[p[0] for p in points],
            hidden=[p[1] for p in points], hidden_tap=[p[2] for p in points])

    def _manifest_header(self) -> dict:
        return {"format_version": fmt.FORMAT_VERSION, "config": to_dict(self.cfg),
                "model": self.model.source, "hidden_size": self.model.cfg.d_model,
                "n_layers": self.model.cfg.n_layers, "tap_layer": self.prefill.tap_layer,
                "dtype": str(self.model.cfg.jnp_dtype)}

    def _summary(self, shards: list[dict], stats: dict) -> dict:
        """Dataset-wide counts, recomputed from the shards' small arrays."""
        finish, lengths = [], []
        for s in shards:
            with np.load(self.out_dir / s["file"]) as z:
                finish.append(z["finish"])
                lengths.append(np.diff(z["output_offsets"]))
        finish_all, lengths_all = np.concatenate(finish), np.concatenate(lengths)
        capped = int((finish_all == fmt.FINISH_CODES["length"]).sum())
        return {**stats, "requests": int(finish_all.size), "capped": capped,
                "capped_share": capped / max(1, finish_all.size),
                "output_tokens": int(lengths_all.sum()),
                "mean_output_len": float(lengths_all.mean()),
                "samples": int(sum(s["num_samples"] for s in shards))}
