"""Predictor settings: collection, head architecture and training, as ``@config`` dataclasses."""

from __future__ import annotations

from ares_jax.config import config


@config
class CollectConfig:
    """How the training data is generated. Recorded in the manifest; a resumed run must match."""

    num_requests: int = 3000
    include_humaneval: bool = True
    # Prompts longer than this (chat template included) are skipped, not truncated: a cut
    # prompt would teach the head about text no user sent.
    max_prompt_tokens: int = 512
    # The serving cap. 512 rather than the pilot's 768 to fit the collection in this machine's
    # time budget; capped requests keep the label cap - t.
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    record_every: int = 16  # a prediction point every k generated tokens (and t = 0)
    max_num_seqs: int = 64
    num_pages: int = 3072
    requests_per_shard: int = 256
    seed: int = 0
    tap_layer: int | None = None  # None: the engine default (n_layers // 2)


@config
class HeadConfig:
    """The ARES MLP head (also the TRAIL-style classifier's trunk sizes)."""

    # "ares" (regression) or "trail" (10-bin classifier with Bayesian refinement).
    kind: str = "ares"
    # "last": the final layer after the norm; "tap": the engine's intermediate tap.
    layer: str = "tap"
    hidden_sizes: tuple[int, ...] = (512, 128)
    dropout: float = 0.1
    # "l1": L1 on tokens; "log_l1": L1 on log(1 + remaining); "budget_l1": L1 on tokens with the
    # prediction a sigmoid fraction of the remaining budget max_tokens - t (see heads.py).
    loss: str = "budget_l1"
    num_bins: int = 10  # trail only
    # Independently initialised copies trained side by side and averaged (a deep ensemble);
    # each keeps the weights of its own best validation epoch.
    members: int = 1


@config
class TrainConfig:
    head: HeadConfig = HeadConfig()
    seed: int = 0
    split_seed: int = 0
    batch_size: int = 256
    max_epochs: int = 60
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    patience: int = 8  # epochs without a validation-MAE improvement before stopping
