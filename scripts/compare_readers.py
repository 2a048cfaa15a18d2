"""How well each reading of the labelled calls classifies them: TF-IDF, sentence embeddings, both.

    .venv/bin/python scripts/compare_readers.py            # train + dev, 10 folds x 3 repeats (~3 min)

A logistic regression (classes weighted by frequency) on each feature set, in repeated stratified
cross-validation over data/train.jsonl + data/dev.jsonl; it prints priority accuracy, urgent recall
and category accuracy. This is where `SecondOpinion`'s readings were chosen: TF-IDF for the priority,
TF-IDF with embeddings beside it for the category, embeddings alone (C=10) for the second reader.
test.jsonl is never read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.embeddings import embed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
READINGS = (("TF-IDF", 1.0), ("embeddings", 1.0), ("embeddings", 10.0), ("TF-IDF + embeddings", 1.0))


def features(reading: str, texts: np.ndarray, meaning: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple:
    """The (train, test) feature matrices of one reading, the vectorizer fitted on the train rows only."""
    if reading == "embeddings":
        return meaning[train], meaning[test]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    words_train, words_test = vectorizer.fit_transform(texts[train]), vectorizer.transform(texts[test])
    if reading == "TF-IDF":
        return words_train, words_test
    return (
        sparse.hstack([words_train, sparse.csr_matrix(meaning[train])]).tocsr(),
        sparse.hstack([words_test, sparse.csr_matrix(meaning[test])]).tocsr(),
    )


def main() -> int:
    rows = [json.loads(line) for name in ("train", "dev") for line in (ROOT / f"data/{name}.jsonl").open()]
    texts = np.array([row["transcript"] for row in rows], dtype=object)
    meaning = embed(list(texts))
    folds = RepeatedStratifiedKFold(n_splits=10, n_repeats=3, random_state=0)
    print(f"{len(rows)} labelled calls, 10-fold cross-validation x 3")
    for reading, c in READINGS:
        figures = []
        for label in ("priority", "category"):
            gold = np.array([row[label] for row in rows])
            right = urgent = urgent_kept = 0
            for train, test in folds.split(texts, gold):
                model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
                train_x, test_x = features(reading, texts, meaning, train, test)
                answers = model.fit(train_x, gold[train]).predict(test_x)
                right += int((answers == gold[test]).sum())
                urgent += int((gold[test] == "urgent").sum())
                urgent_kept += int(((answers == "urgent") & (gold[test] == "urgent")).sum())
            figures.append(f"{label} {right / (3 * len(rows)):.1%}")
            if label == "priority":
                figures.append(f"urgent recall {urgent_kept / urgent:.1%}")
        print(f"{reading:20s} C={c:<4g} " + ", ".join(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
