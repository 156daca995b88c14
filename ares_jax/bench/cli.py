"""``ares-jax bench serve``: benchmark any OpenAI-compatible server (ours, vLLM's, SGLang's).

Streams --num-prompts requests from a dataset (sharegpt, random, or a trace CSV) at
--request-rate (Poisson, or gamma arrivals with --burstiness; a trace uses its own times) and
reports TTFT, TPOT, ITL and E2EL percentiles, token throughput and, with --goodput, the rate of
requests meeting every SLO. Flag names follow `vllm bench serve`. Progress goes to stderr; the
table (or with --json one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any

from ares_jax.bench.config import (
    DATASETS,
    ENDPOINTS,
    METRICS,
    BenchConfig,
    BenchError,
    parse_goodput,
    parse_metrics,
    parse_percentiles,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks against a running server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("serve", help="serving benchmark for an OpenAI-compatible server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=None,
                   help="server root, e.g. http://127.0.0.1:8000 (default: --host/--port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    g.add_argument("--model", default=None, help="default: the first id from GET /v1/models")
    g.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a stream may stay silent before the request fails")
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=DATASETS, default="sharegpt")
    g.add_argument("--dataset-path", default=None,
                   help="trace CSV arrival_s,prompt_tokens,output_tokens (dataset trace)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform on [len*(1-r), len*(1+r)]")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="max_tokens for every ShareGPT request (default: the answer's length)")
    g.add_argument("--tokenizer", default="auto",
                   help="builds prompts of a token length: auto (the embedded model's if "
                        "installed, else words), embedded, words, or a .gguf / tokenizer.json / "
                        "HF directory")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s (inf: all at once); ignored for a trace")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 steadier")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight; later arrivals wait for a slot")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("sampling")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (a vLLM/SGLang extension) so every answer runs to "
                        "max_tokens")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request body")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:10000; goodput counts requests "
                        "meeting all")
    g.add_argument("--percentile-metrics", default=",".join(METRICS),
                   help=f"comma-separated, from {','.join(METRICS)}")
    g.add_argument("--metric-percentiles", default="50,90,99")
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")
    g.add_argument("--save-result", action="store_true",
                   help="write the report and every request's record to a JSON file")
    g.add_argument("--result-dir", default=".")
    g.add_argument("--result-filename", default=None)
    g.add_argument("--plot", default=None, metavar="DIR",
                   help="write latency CDFs and a timeline (PNG) here")
    g.add_argument("--disable-tqdm", action="store_true")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError with the offending flag's story."""
    extra = None
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as err:
            raise ValueError(f"--extra-body is not JSON: {err}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    return BenchConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        sharegpt_output_len=args.sharegpt_output_len,
        tokenizer=args.tokenizer,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=extra,
        goodput=parse_goodput(args.goodput) if args.goodput else None,
        percentile_metrics=parse_metrics(args.percentile_metrics),
        metric_percentiles=parse_percentiles(args.metric_percentiles),
        request_timeout_s=args.request_timeout,
        disable_tqdm=args.disable_tqdm,
        plot_dir=args.plot,
    )


def result_path(args: argparse.Namespace, report: dict[str, Any]) -> Path:
    """vLLM's default name: openai-{rate}qps[-concurrency{c}]-{model}-{time}.json."""
    if args.result_filename:
        return Path(args.result_dir) / args.result_filename
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    model = str(report["model"]).rstrip("/").split("/")[-1]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(args.result_dir) / f"openai-{report['request_rate']}qps{conc}-{model}-{stamp}.json"


def main(args: argparse.Namespace) -> int:
    from ares_jax.bench.runner import run_benchmark_detailed

    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"ares-jax bench serve: error: {err}", file=sys.stderr)
        return 2
    try:
        result = run_benchmark_detailed(cfg)
    except (BenchError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"ares-jax bench serve: error: {err}", file=sys.stderr)
        return 1
    report = result.report
    if args.save_result:
        path = result_path(args, report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**report, "requests": [r.to_json() for r in result.records]},
                                   indent=1))
        print(f"saved {path}", file=sys.stderr)
    if args.json:
        for note in report["notes"]:  # the table prints them itself
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps(report))
    else:
        from ares_jax.bench.report import format_table

        print(format_table(report, cfg))
    if report["completed"] == 0:
        print(f"ares-jax bench serve: error: all {report['failed']} requests failed; first: "
              f"{report['errors'][0]['error'] if report['errors'] else '?'}", file=sys.stderr)
        return 1
    return 0
