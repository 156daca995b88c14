"""Evaluation (``ares-jax predictor eval``): every method on the same held-out prediction points.

The test requests (15%, by request, ``split_seed``) are never seen by training or early
stopping. Baselines are fitted on the training requests of the same split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ares_jax.predictor.baselines import (
    MedianBaseline,
    SurvivalTable,
    clip_remaining,
    trail_refine,
    transition_matrix,
)
from ares_jax.predictor.checkpoint import load_head
from ares_jax.predictor.data import load_dataset, split_by_request
from ares_jax.predictor.heads import count_params, remaining_bins
from ares_jax.predictor.train import (
    EVAL_BATCH,
    Points,
    member_predictions,
    padded_batch,
    predict_points,
)

# Buckets of tokens generated so far (upper bounds exclusive); t = 0 is the prefill prediction.
T_BUCKETS = ((0, 1), (1, 128), (128, 256), (256, 384), (384, 1 << 30))


def _bucket_name(lo: int, hi: int) -> str:
    return "t=0" if (lo, hi) == (0, 1) else (f"t>={lo}" if hi >= 1 << 30 else f"t={lo}-{hi - 1}")


def score(pred: np.ndarray, y: np.ndarray, t: np.ndarray, capped: np.ndarray) -> dict:
    err = np.abs(pred - y)
    by_t = {}
    for lo, hi in T_BUCKETS:
        sel = (t >= lo) & (t < hi)
        by_t[_bucket_name(lo, hi)] = float(err[sel].mean()) if sel.any() else None
    curve = {int(v): float(err[t == v].mean()) for v in np.unique(t)}
    return {"mae": float(err.mean()), "mae_by_t": by_t,
            "mae_capped_requests": float(err[capped].mean()) if capped.any() else None,
            "mae_stopped_requests": float(err[~capped].mean()) if (~capped).any() else None,
            "mae_curve": curve}


def _trail_predictions(head, train_pts: Points, train_ds, test_pts: Points, test_ds
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(refined, unrefined) TRAIL estimates on the test points."""
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def probs_fn(head, h, ht, t, m):
        return head.bin_probs(h, ht, t, m)

    n = len(test_pts)
    probs = np.empty((n, head.cfg.num_bins), np.float32)
    for s in range(0, n, EVAL_BATCH):
        e = min(s + EVAL_BATCH, n)
        probs[s:e] = np.asarray(probs_fn(head, *padded_batch(test_pts, s, e, EVAL_BATCH)))[
            : e - s]
    bins = np.asarray(remaining_bins(jnp.asarray(train_pts.remaining),
                                     jnp.asarray(train_pts.max_tokens), head.cfg.num_bins))
    trans = transition_matrix(bins, train_ds.sample_request, train_ds.t, head.cfg.num_bins)
    post = trail_refine(probs, test_ds.sample_request, test_ds.t, trans)
    values = np.asarray(head.bin_values.get_value())
    m = test_pts.max_tokens.astype(np.float32)
    refined = clip_remaining((post @ values) * m, test_pts.t, test_pts.max_tokens)
    unrefined = predict_points(head, test_pts)
    return refined, unrefined


def evaluate(data_dir: str | Path, heads: dict[str, str] | None = None,
             prompt_only: str | None = None, split_seed: int = 0,
             max_shards: int | None = None) -> dict:
    ds = load_dataset(data_dir, max_shards)
    train_rows, val_rows, test_rows = split_by_request(ds.index, split_seed)
    train, test = ds.select_requests(train_rows), ds.select_requests(test_rows)
    y, t, m = test.remaining, test.t, test.sample_max_tokens
    capped = test.finished_by_cap[test.sample_request]
    methods: dict[str, dict] = {}

    def add(name: str, pred: np.ndarray, params: int, **info) -> None:
        methods[name] = {**score(pred, y, t, capped), "params": int(params), **info}

    median = MedianBaseline.fit(train.remaining)
    add("median", median.predict(t, m), 0, table_entries=median.num_entries)
    table = SurvivalTable.fit(train.t, train.remaining)
    add("survival_table", table.predict(t, m), 0, table_entries=table.num_entries)
    for name, path in (heads or {}).items():
        head = load_head(Path(path))
        test_pts = Points.from_dataset(test)
        info = {"checkpoint": str(path), "layer": head.cfg.layer, "kind": head.cfg.kind,
                "loss": head.cfg.loss, "hidden_sizes": list(head.cfg.hidden_sizes),
                "members": head.cfg.members}
        if head.cfg.kind == "trail":
            refined, unrefined = _trail_predictions(
                head, Points.from_dataset(train), train, test_pts, test)
            add(name, refined, count_params(head), **info, bayesian_refinement=True)
            add(f"{name}_unrefined", unrefined, count_params(head), **info,
                bayesian_refinement=False)
        else:
            members = member_predictions(head, test_pts)
            if head.cfg.members > 1:  # what each member alone would score, to show the gain
                info["member_mae"] = [float(x) for x in np.abs(members - y).mean(axis=1)]
            add(name, members.mean(axis=0), count_params(head), **info)
    if prompt_only:
        from ares_jax.predictor.prompt_only import PromptOnlyPredictor, t0_hidden

        predictor = PromptOnlyPredictor.load(prompt_only)
        totals = predictor.predict_totals(test.prompt_ids, last_hidden=t0_hidden(test))
        add("prompt_only", clip_remaining(totals[test.sample_request] - t, t, m),
            predictor.num_params, checkpoint=str(prompt_only),
            fine_tuned=predictor.fine_tuned_description)
    return {
        "data": str(data_dir), "max_shards": max_shards, "requests": ds.num_requests,
        "capped_share": float(ds.finished_by_cap.mean()), "split_seed": split_seed,
        "test_requests": int(test_rows.size), "test_points": int(t.size),
        "train_requests": int(train_rows.size), "val_requests": int(val_rows.size),
        "test_capped_share": float(test.finished_by_cap.mean()),
        "methods": methods, "comparisons": _comparisons(methods),
    }


def _comparisons(methods: dict[str, dict]) -> dict:
    """The issue's targets as ratios (present only when both sides were evaluated)."""
    out = {}
    ares = methods.get("ares")
    if ares is None:
        return out
    for other in ("prompt_only", "survival_table", "trail", "median"):
        if other in methods and methods[other]["mae"] > 0:
            out[f"ares_mae_over_{other}"] = ares["mae"] / methods[other]["mae"]
    if "prompt_only" in methods:
        out["ares_params_over_prompt_only"] = ares["params"] / methods["prompt_only"]["params"]
    return out


def format_table(report: dict) -> str:
    names = [b for b in next(iter(report["methods"].values()))["mae_by_t"]]
    head = f"{'method':<22}{'params':>12}{'MAE':>9}" + "".join(f"{n:>11}" for n in names)
    lines = [head, "-" * len(head)]
    for name, r in report["methods"].items():
        cells = "".join(f"{v:>11.1f}" if v is not None else f"{'-':>11}"
                        for v in r["mae_by_t"].values())
        lines.append(f"{name:<22}{r['params']:>12,}{r['mae']:>9.1f}{cells}")
    for k, v in report["comparisons"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)


def plot_mae(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors  # more methods than the default 10-colour cycle
    for i, (name, r) in enumerate(report["methods"].items()):
        xs = sorted(r["mae_curve"], key=int)
        learned_ares = name.startswith("ares")
        ax.plot([int(x) for x in xs], [r["mae_curve"][x] for x in xs], label=name,
                color=colors[i % len(colors)], marker="." if learned_ares else None,
                linestyle="-" if learned_ares else "--", linewidth=2.2 if name == "ares" else 1.2)
    ax.set_xlabel("tokens generated so far (t)")
    ax.set_ylabel("MAE of remaining length (tokens)")
    ax.set_title(f"Held-out MAE vs progress ({report['test_requests']} requests)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
