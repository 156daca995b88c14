"""``ares-jax bench serve``: a serving benchmark for any OpenAI-compatible server (ours, vLLM's,
SGLang's). Streams requests at a chosen arrival process and reports TTFT, TPOT, ITL, E2EL,
throughput and goodput with vLLM's definitions (``docs/BENCH_SERVE.md``).

From Python::

    from ares_jax.bench import BenchConfig, run_benchmark
    report = run_benchmark(BenchConfig(base_url="http://127.0.0.1:8000", num_prompts=100,
                                       dataset_name="random", request_rate=4.0))
    print(report["request_throughput"], report["p99_tpot_ms"])
"""

from ares_jax.bench.config import BenchConfig, BenchError
from ares_jax.bench.datasets import SampleRequest
from ares_jax.bench.records import RequestRecord
from ares_jax.bench.runner import (
    BenchResult,
    arun_benchmark,
    run_benchmark,
    run_benchmark_detailed,
)

__all__ = [
    "BenchConfig", "BenchError", "BenchResult", "RequestRecord", "SampleRequest",
    "arun_benchmark", "run_benchmark", "run_benchmark_detailed",
]
