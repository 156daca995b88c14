"""Prometheus metrics: vLLM's names and units under an ``ares:`` prefix.

Two sources feed one ``CollectorRegistry`` per app:
- request histograms and token counters are observed from the streams the server hands out
  (``observe_finished`` / ``observe_aborted``), so they describe what clients saw;
- cluster gauges and cumulative counters are read from ``backend.cluster_state()`` at scrape
  time by a custom collector (exact values, no deltas to lose). Migration downtime is a
  histogram, so it is fed from the ``migrations`` list of every state the server reads,
  remembering which migrations it has already counted.

Every series carries ``model_name``, as vLLM's do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ares_jax.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# No "<name>_created" series next to every counter and histogram (vLLM turns them off too).
disable_created_metrics()

# vLLM's buckets for the request latencies.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DOWNTIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    """The app's metrics. ``state_fn`` is the backend's ``cluster_state``."""

    def __init__(self, model_name: str, state_fn: Callable[[], dict]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = hist("ares:time_to_first_token_seconds",
                         "Time to first token (arrival to first token), seconds.", TTFT_BUCKETS)
        self.itl = hist("ares:inter_token_latency_seconds",
                        "Time between consecutive output tokens of a request, seconds.",
                        ITL_BUCKETS)
        self.e2e = hist("ares:e2e_request_latency_seconds",
                        "End-to-end request latency (arrival to finish), seconds.",
                        REQUEST_BUCKETS)
        self.queue = hist("ares:request_queue_time_seconds",
                          "Time a request waited before its first prefill, seconds.",
                          REQUEST_BUCKETS)
        self.predicted = hist("ares:predicted_remaining_tokens",
                              "Remaining output length predicted by the length head, tokens "
                              "(every prediction of every finished request).", TOKEN_BUCKETS)
        self.pred_error = hist("ares:predictor_abs_error_tokens",
                               "|predicted - true remaining output|, tokens, per prediction, "
                               "measured when the request finishes.", TOKEN_BUCKETS)
        self.downtime = hist("ares:migration_downtime_seconds",
                             "Stop-and-copy window of committed migrations (the request "
                             "decodes nowhere), seconds.", DOWNTIME_BUCKETS)
        self.prompt_tokens = Counter("ares:prompt_tokens", "Prompt tokens of accepted requests.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("ares:generation_tokens",
                                         "Generated tokens delivered to clients.", labels,
                                         registry=reg).labels(model_name)
        self.success = Counter("ares:request_success", "Finished requests by finish reason.",
                               [*labels, "finished_reason"], registry=reg)
        self._lock = threading.Lock()
        self._seen_migrations: set[tuple] = set()
        self._state_fn = state_fn
        self._cluster = _ClusterCollector(self, state_fn)
        self.registry.register(self._cluster)

    # ------------------------------------------------------------------ from the streams

    def observe_accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        n = len(out.token_ids)
        self.generation_tokens.inc(n)
        self.success.labels(self.model_name, out.finish_reason or "unknown").inc()
        for value, h in ((m.ttft, self.ttft), (m.e2e, self.e2e), (m.queue_time, self.queue)):
            if value is not None:
                h.observe(max(value, 0.0))
        for gap in m.tpot_per_token:
            self.itl.observe(max(gap, 0.0))
        for generated, predicted in m.predictions:
            self.predicted.observe(max(predicted, 0.0))
            self.pred_error.observe(abs(predicted - (n - generated)))

    def observe_aborted(self, tokens_delivered: int) -> None:
        """A client left before its request finished (the backend aborted it)."""
        self.generation_tokens.inc(tokens_delivered)
        self.success.labels(self.model_name, "abort").inc()

    # ------------------------------------------------------------------ from the cluster

    def observe_cluster(self, state: dict) -> None:
        """Count committed migrations not seen before into the downtime histogram."""
        with self._lock:
            current = set()
            for rec in state.get("migrations", ()):
                key = (rec.get("request_id"), rec.get("src"), rec.get("dst"),
                       rec.get("finished_at"))
                current.add(key)
                if key in self._seen_migrations or rec.get("outcome") != "committed":
                    continue
                if rec.get("downtime_ms") is not None:
                    self.downtime.observe(max(rec["downtime_ms"], 0.0) / 1e3)
            # Only the listed (most recent) migrations can reappear; forget older keys.
            self._seen_migrations = current

    def render(self) -> bytes:
        """One scrape: read the cluster state once, fold its new migrations into the downtime
        histogram *before* the histograms are written, and give the same state to the
        collector."""
        state = self._state_fn() or {}
        self.observe_cluster(state)
        self._cluster.pending = state
        try:
            return generate_latest(self.registry)
        finally:
            self._cluster.pending = None


class _ClusterCollector(Collector):
    """Gauges and cumulative counters straight from ``cluster_state()`` at scrape time."""

    def __init__(self, metrics: ServerMetrics, state_fn: Callable[[], dict]) -> None:
        self.metrics = metrics
        self.state_fn = state_fn
        self.pending: dict | None = None  # the state of the scrape in progress, if any

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the state; registering must not call the backend

    def collect(self) -> Iterable[Metric]:
        state = self.pending
        if state is None:  # collected directly (not through render)
            state = self.state_fn() or {}
            self.metrics.observe_cluster(state)
        name = self.metrics.model_name
        running = GaugeMetricFamily("ares:num_requests_running",
                                    "Requests admitted and not yet finished.",
                                    labels=["model_name"])
        running.add_metric([name], float(state.get("running", 0)))
        waiting = GaugeMetricFamily("ares:num_requests_waiting",
                                    "Requests waiting for admission.", labels=["model_name"])
        waiting.add_metric([name], float(state.get("waiting", 0)))
        usage = GaugeMetricFamily("ares:kv_cache_usage_perc",
                                  "KV-cache usage of each replica: used / total pages "
                                  "(1 = full), as vLLM reports it.",
                                  labels=["model_name", "replica"])
        replica_running = GaugeMetricFamily("ares:replica_num_requests_running",
                                            "Requests decoding on each replica.",
                                            labels=["model_name", "replica"])
        for r in state.get("replicas", ()):
            total = r.get("kv_pages_total") or 0
            used = r.get("kv_pages_used") or 0
            rid = str(r.get("replica_id"))
            usage.add_metric([name, rid], used / total if total else 0.0)
            replica_running.add_metric([name, rid], float(r.get("running", 0)))
        counters = state.get("counters", {})
        preempt = CounterMetricFamily("ares:num_preemptions",
                                      "Requests preempted (recomputed from their prompt).",
                                      labels=["model_name"])
        preempt.add_metric([name], float(counters.get("preemptions", 0)))
        migrations = CounterMetricFamily("ares:migrations", "Finished migrations by outcome.",
                                         labels=["model_name", "outcome"])
        migrations.add_metric([name, "committed"],
                              float(counters.get("migrations_committed", 0)))
        migrations.add_metric([name, "aborted"], float(counters.get("migrations_aborted", 0)))
        kv_bytes = CounterMetricFamily("ares:migration_kv_bytes",
                                       "KV bytes moved by migrations.", labels=["model_name"])
        kv_bytes.add_metric([name], float(counters.get("migration_bytes", 0)))
        fallback = CounterMetricFamily("ares:fallback_dispatches",
                                       "Dispatches placed elsewhere than the policy chose.",
                                       labels=["model_name"])
        fallback.add_metric([name], float(counters.get("fallback_dispatches", 0)))
        capped = CounterMetricFamily(
            "ares:migrations_capped",
            "Migrations the policy proposed that migration.max_starts_per_minute dropped.",
            labels=["model_name"])
        capped.add_metric([name], float(counters.get("migrations_capped", 0)))
        yield from (running, waiting, usage, replica_running, preempt, migrations, kv_bytes,
                    fallback, capped)
