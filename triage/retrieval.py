"""Which labelled calls a new call resembles, and what a plain classifier on them would answer.

Both work on TF-IDF vectors of the transcripts (word 1-2-grams, sublinear tf), fitted on the
labelled calls in well under a second, offline and deterministic, so a program file only needs
to carry the labelled calls themselves: every process that loads it refits the same index.

* `SimilarCalls`: the k labelled calls most similar to a transcript (cosine similarity),
  the demos of `triage.nearest_demos.NearestDemos`.
* `SecondOpinion`: a logistic regression on the same vectors (classes weighted by frequency,
  C=1, chosen on dev: priority 90.4% / category 71.2% with train as the pool), with the calls'
  sentence embeddings beside them or alone when asked. Its probabilities bound the program's
  labels and are what the review queue compares the LM's answer with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression


def _vectorizer() -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)


class SimilarCalls:
    """A similarity index over a fixed list of transcripts."""

    def __init__(self, transcripts: Sequence[str]) -> None:
        if not transcripts:
            raise ValueError("SimilarCalls needs at least one transcript")
        self.vectorizer = _vectorizer()
        self.matrix = self.vectorizer.fit_transform(transcripts)

    def vector(self, transcript: str) -> Any:
        """The transcript's TF-IDF row (sparse, 1 x vocabulary): what both lookups below read."""
        return self.vectorizer.transform([transcript])

    def most_similar(self, transcript: str, k: int) -> list[tuple[int, float]]:
        """(index, cosine similarity) of the k most similar transcripts, most similar first (ties: index order)."""
        return self.most_similar_to(self.vector(transcript), k)

    def most_similar_to(self, vector: Any, k: int) -> list[tuple[int, float]]:
        similarities = (self.matrix @ vector.T).toarray().ravel()
        order = np.argsort(-similarities, kind="stable")[: max(k, 0)]
        return [(int(i), float(similarities[i])) for i in order]


def label_totals(votes: Sequence[tuple[str, float]]) -> dict[str, float]:
    """label -> summed similarity of the calls carrying it, in the order the labels are met."""
    totals: dict[str, float] = {}
    for label, similarity in votes:
        totals[label] = totals.get(label, 0.0) + similarity
    return totals


def label_shares(votes: Sequence[tuple[str, float]]) -> dict[str, float]:
    """label -> its share of the summed similarity (equal shares when every similarity is 0)."""
    totals = label_totals(votes)
    whole = sum(totals.values())
    if whole <= 0:
        return {label: 1 / len(totals) for label in totals}
    return {label: total / whole for label, total in totals.items()}


def weighted_vote(votes: Sequence[tuple[str, float]]) -> str:
    """The label with the largest summed similarity; a tie goes to the label met first (the nearer call's)."""
    totals = label_totals(votes)
    return max(totals, key=totals.__getitem__)


class SecondOpinion:
    """Class probabilities of one label (priority or category) from a classifier on the labelled calls.

    It reads their TF-IDF vectors (the default), their sentence embeddings (`triage.embeddings`)
    beside them (`on_index(..., embeddings=)`: the category, 82.9% against 71.3% in cross-validation),
    or the embeddings alone (`on_embeddings`: the review's second reader, which errs where TF-IDF
    does not). Classes are weighted by frequency.
    """

    def __init__(self, transcripts: Sequence[str], labels: Sequence[str]) -> None:
        vectorizer = _vectorizer()
        self._fit(vectorizer.fit_transform(transcripts), None, labels, vectorizer)

    def _fit(
        self,
        words: Any,
        meaning: np.ndarray | None,
        labels: Sequence[str],
        vectorizer: TfidfVectorizer | None,
        c: float = 1.0,
    ) -> None:
        if len(set(labels)) < 2:
            raise ValueError("SecondOpinion needs at least two different labels")
        self._vectorizer = vectorizer
        self.reads_words, self.reads_meaning = words is not None, meaning is not None
        self._model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        self._model.fit(_side_by_side(words, meaning), list(labels))

    @classmethod
    def from_pool(cls, pool: Sequence[dict[str, Any]], label: str) -> SecondOpinion | None:
        """A classifier of `label` on a program's demo pool, or None when the pool holds fewer than two labels."""
        labelled = [demo for demo in pool if isinstance(demo.get(label), str) and demo.get("transcript")]
        if len({demo[label] for demo in labelled}) < 2:
            return None
        return cls([demo["transcript"] for demo in labelled], [demo[label] for demo in labelled])

    @classmethod
    def on_index(
        cls, index: SimilarCalls, labels: Sequence[str | None], embeddings: np.ndarray | None = None
    ) -> SecondOpinion | None:
        """A classifier on the rows of `index` that carry a label (`labels[i]` for row i, None for none),
        reading the index's own TF-IDF vectors (one transform per transcript serves both), and with
        `embeddings` (row i: transcript i's) their sentence embeddings beside them."""
        rows = _labelled_rows(labels)
        if rows is None:
            return None
        opinion = cls.__new__(cls)
        meaning = None if embeddings is None else embeddings[rows]
        opinion._fit(index.matrix[rows], meaning, [labels[i] for i in rows], index.vectorizer)
        return opinion

    @classmethod
    def on_embeddings(cls, embeddings: np.ndarray, labels: Sequence[str | None]) -> SecondOpinion | None:
        """A classifier on sentence embeddings alone (row i: the call labelled `labels[i]`); C=10,
        chosen in cross-validation on the labelled calls (priority 77.0%, against 76.7% with C=1)."""
        rows = _labelled_rows(labels)
        if rows is None:
            return None
        opinion = cls.__new__(cls)
        opinion._fit(None, embeddings[rows], [labels[i] for i in rows], None, c=10.0)
        return opinion

    def probabilities(self, transcript: str) -> dict[str, float]:
        """label -> probability, for every label seen in training (a classifier on TF-IDF alone)."""
        return self.probabilities_of(self._vectorizer.transform([transcript]))

    def probabilities_of(self, vector: Any = None, embedding: np.ndarray | None = None) -> dict[str, float]:
        """The same, from a transcript's TF-IDF row (of the vectorizer it was fitted with) and/or its
        sentence embedding: whichever the classifier reads."""
        if (self.reads_words and vector is None) or (self.reads_meaning and embedding is None):
            raise ValueError("the classifier reads " + ("TF-IDF vectors" if vector is None else "sentence embeddings"))
        words = vector if self.reads_words else None
        meaning = np.reshape(embedding, (1, -1)) if self.reads_meaning else None
        row = self._model.predict_proba(_side_by_side(words, meaning))[0]
        return {str(label): float(p) for label, p in zip(self._model.classes_, row, strict=True)}


def _labelled_rows(labels: Sequence[str | None]) -> list[int] | None:
    """The rows that carry a label, or None when they hold fewer than two different labels."""
    rows = [i for i, label in enumerate(labels) if isinstance(label, str)]
    return rows if len({labels[i] for i in rows}) >= 2 else None


def _side_by_side(words: Any, meaning: np.ndarray | None) -> Any:
    """TF-IDF rows and embedding rows as one feature matrix (either may be None)."""
    if meaning is None:
        return words
    if words is None:
        return meaning
    return sparse.hstack([words, sparse.csr_matrix(meaning)]).tocsr()
