"""Bookkeeping shared by the sample-data generators: regenerate only when the parameters change."""

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"


def _read_params(out_dir: Path) -> dict[str, Any] | None:
    """The stored record of a completed earlier run, or None."""
    try:
        with open(out_dir / PARAMS_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate_splits_once(
    out_dir: Path,
    *,
    what: str,
    generator_version: int,
    num_train: int,
    num_val: int,
    seed: int,
    marker_files: Sequence[str],
    remove_previous: Callable[[Path], None],
    generate_split: Callable[[Path, str, int, int], dict[str, int]],
    force: bool,
) -> dict[str, Any]:
    """Run ``generate_split(out_dir, split, num_images, seed)`` for the train and val splits,
    unless ``out_dir`` already holds a complete run (``marker_files`` present, same generator
    version, counts and seed) and not ``force``.

    ``params.json`` is written last, so an interrupted run is redone next time. Returns the
    per-split counts, ``skipped`` and ``seconds``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train} num_val={num_val}")
    params = {
        "generator_version": generator_version,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
    }
    split_sizes = {"train": int(num_train), "val": int(num_val)}
    start = time.perf_counter()
    previous = _read_params(out_dir)
    complete = all((out_dir / name).is_file() for name in marker_files)
    if not force and complete and previous is not None and previous.get("params") == params:
        logger.info("%s already in %s with the same parameters; skipping.", what, out_dir)
        return {**previous["counts"], "skipped": True, "seconds": time.perf_counter() - start}

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_previous(out_dir)
    counts = {
        split: generate_split(out_dir, split, n, int(seed)) for split, n in split_sizes.items()
    }
    with open(out_dir / PARAMS_FILE, "w") as f:
        json.dump({"params": params, "counts": counts}, f, indent=2, sort_keys=True)
        f.write("\n")
    seconds = time.perf_counter() - start
    sizes = " + ".join(f"{n} {split}" for split, n in split_sizes.items())
    logger.info("Generated %s %s images in %s (%.1f s).", sizes, what, out_dir, seconds)
    return {**counts, "skipped": False, "seconds": seconds}
