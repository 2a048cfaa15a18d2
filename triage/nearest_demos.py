"""Per-call demos and label bounds from the labelled calls: `NearestDemos`, a module's plain state.

The modules in `triage.programs` hold one; it picks each call's demos among the labelled calls most
similar to it and says which labels (and whether a location) its answer may take. Everything it
needs is the pool of labelled calls and a few settings, saved in the program file; the similarity
index, classifiers and embeddings are rebuilt from the pool on first use in each process.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import numpy as np

from triage.cues import danger_phrases
from triage.embeddings import embed, embed_pool
from triage.retrieval import SecondOpinion, SimilarCalls, label_shares, label_totals, weighted_vote

RECENT_LOOKUPS = 256  # per NearestDemos: well over the calls a stage actor has in flight
SIMILAR_DEPTH = 10  # neighbours looked up at once, whichever fewer are asked for


def bounded_labels(totals: dict[str, float], share: float, urgent_share: float | None = None) -> tuple[str, ...]:
    """The labels that stay choices, the likeliest first (ties: the first met): those holding at
    least `share` of the summed weight (`urgent`: `urgent_share`, if given); the likeliest always."""
    ranked = sorted(totals, key=lambda value: -totals[value])  # stable: the nearer call's first
    whole = sum(totals.values()) or 1.0

    def needed(value: str) -> float:
        return urgent_share if value == "urgent" and urgent_share is not None else share

    return tuple(v for i, v in enumerate(ranked) if i == 0 or totals[v] / whole >= needed(v))


@dataclass(frozen=True)
class Neighbourhood:
    """What the labelled calls most similar to one transcript say about it."""

    demos: list[dspy.Example] = field(default_factory=list)  # the demos to show, the most similar last
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # output field -> the labels it may take


class NearestDemos:
    """Per-call demos: the `k` labelled calls most similar to the transcript, the most similar last.

    DSPy's `KNNFewShot` has the idea but compiles to a closure that `save()` cannot keep; here
    the pool of complete demos and the retrieval settings are plain state, saved in the program
    file beside the predictor's own, and the similarity index (`SimilarCalls`) is rebuilt from
    the pool on first use in each process. An empty pool (the default) leaves the predictor's
    fixed demos in charge. A demo transcript longer than `max_demo_chars` is shown cut at a word
    boundary: every demo is re-read in every prompt, and prompt length is what a small local
    model pays for most. (Cut, not skipped: keeping only short calls in the pool cost the
    nearest call's label 3-7 points of priority accuracy on dev and test.)

    With `vote` > 0 the last demo speaks for the neighbourhood rather than for one call: of the
    `vote` most similar calls, the most similar one whose priority (and, if possible, category)
    wins their similarity-weighted vote. A small model copies the labels of the demo it read
    last, and the vote of five neighbours is right more often than the single nearest call
    (priority on dev: 86.3% against 78.1%, train as the pool).

    With `choices` > 0 the answer's priority and category are chosen among the labels that the
    `choices` most similar calls carry (listed by their summed similarity, the likeliest first),
    instead of among all labels: the prompt says so and a constrained decoder enforces it. A label
    stays a choice if it holds at least `choice_share` of the neighbours' summed similarity (the
    likeliest always stays). `urgent` may have its own, lower share (`urgent_share`): under-triage
    is the costliest error, so urgent stays a choice on weaker evidence than the other labels. The
    model decides whenever more than one label is left; when one is, the label is the neighbours'.
    `optimize` chooses the shares offline and turns the bound on only if it scores better on dev.

    The labels named in `classified` are bounded by a classifier on the pool (`SecondOpinion`)
    instead of by the neighbours: a label stays a choice with a probability of at least
    `classifier_share`. On dev (train as the pool) the classifier's likeliest category is right
    more often than the neighbours' (71.2% against 68.5%); `optimize` decides from that, offline.
    The priority's source (neighbours or classifier) and shares are chosen offline too, leave-one-out
    on train + dev (`nearest_search.choose_priority_bound`); `urgent_share` holds for either.

    With `urgent_on_danger`, urgent is the only priority choice whenever the caller's words describe
    present danger (`triage.cues.danger_phrases`: "not breathing", "gun", "flames"), whatever the
    bound says: all 35 calls of train + dev with such a phrase are urgent, and the classifier's
    bound left urgent out for one of them (leave-one-out). Offered urgent beside the bound's
    not_an_emergency, listed first, the embedded model still took not_an_emergency (out of fold);
    a hosted model can still answer otherwise, and is reviewed (`review.bound_reasons`).

    The labels named in `embedded` are classified from the calls' sentence embeddings
    (`triage.embeddings`) beside their TF-IDF vectors, and such a program also has a second reader
    (`reader_probabilities`: the embeddings alone) for the review queue. `optimize` lists a label
    when its classifier is right more often on dev that way (category: 78.1% against 71.2%).

    With `location_below` > 0 a call's location may only be empty when a classifier on the pool
    (`states_location`: does the caller name a place at all?) gives it less than that probability.
    57 of the 290 labelled calls name none, and the embedded model, whose grammar holds it to a
    span of the transcript, answered every one of them with some words of the call ("the little
    ones", "in Lexington"; out of fold). `optimize` chooses the threshold out of fold on train +
    dev (`nearest_search.choose_location_bound`) and keeps it only if the model scores better with it.
    """

    def __init__(
        self,
        pool: Sequence[dict[str, Any]] = (),
        k: int = 3,
        max_demo_chars: int | None = None,
        vote: int = 0,
        choices: int = 0,
        choice_share: float = 0.0,
        classified: Sequence[str] = (),
        classifier_share: float = 0.0,
        urgent_share: float | None = None,
        embedded: Sequence[str] = (),
        urgent_on_danger: bool = False,
        location_below: float = 0.0,
    ) -> None:
        self.pool = [dict(demo) for demo in pool]
        self.k = k
        self.max_demo_chars = max_demo_chars
        self.vote = vote
        self.choices = choices
        self.choice_share = choice_share
        self.classified = tuple(classified)
        self.classifier_share = classifier_share
        self.urgent_share = urgent_share  # None: the same as choice_share
        self.embedded = tuple(embedded)
        self.urgent_on_danger = urgent_on_danger
        self.location_below = location_below
        self._index: SimilarCalls | None = None
        self._pool_embeddings: np.ndarray | None = None
        self._classifiers: dict[tuple[str, str], SecondOpinion | None] = {}
        # The last calls' lookups: the program, its stage's review and evaluate all ask about the
        # same transcript (each lookup is a TF-IDF transform and a product with the pool, ~2 ms).
        self._recent: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.pool) and self.k > 0

    def dump_state(self) -> dict[str, Any]:
        state = {"k": self.k, "max_demo_chars": self.max_demo_chars, "vote": self.vote, "pool": self.pool}
        if self.choices:
            state |= {"choices": self.choices, "choice_share": self.choice_share}
            if self.urgent_share is not None:
                state["urgent_share"] = self.urgent_share
            if self.urgent_on_danger:
                state["urgent_on_danger"] = True
        if self.classified:
            state |= {"classified": list(self.classified), "classifier_share": self.classifier_share}
        if self.embedded:
            state["embedded"] = list(self.embedded)
        if self.location_below:
            state["location_below"] = self.location_below
        return state

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Settings a state leaves out (saved before they existed, or unused) take their defaults."""
        state = state or {}
        self.__init__(state.get("pool", ()), **{name: state[name] for name in SETTINGS if name in state})

    def settings(self) -> dict[str, Any]:
        """Every setting but the pool, as the constructor takes them."""
        return {name: getattr(self, name) for name in SETTINGS}

    def _remembered(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        value = compute()
        with self._lock:
            self._recent[key] = value
            while len(self._recent) > RECENT_LOOKUPS:
                self._recent.popitem(last=False)
        return value

    def _built_index(self) -> SimilarCalls:
        with self._lock:
            if self._index is None:
                self._index = SimilarCalls([demo["transcript"] for demo in self.pool])
            return self._index

    def _vector(self, transcript: str) -> Any:
        index = self._built_index()
        return self._remembered(("vector", transcript), lambda: index.vector(transcript))

    def _most_similar(self, transcript: str, n: int) -> list[tuple[int, float]]:
        vector, depth = self._vector(transcript), max(n, SIMILAR_DEPTH)
        index = self._built_index()
        found = self._remembered(("similar", transcript, depth), lambda: index.most_similar_to(vector, depth))
        return found[:n]

    def _embeddings(self) -> np.ndarray:
        """The pool's sentence embeddings (computed once per process: ~4 s for 290 calls)."""
        with self._lock:
            if self._pool_embeddings is None:
                self._pool_embeddings = embed_pool(tuple(demo["transcript"] for demo in self.pool))
            return self._pool_embeddings

    def _embedding(self, transcript: str) -> np.ndarray:
        return self._remembered(("embedding", transcript), lambda: embed([transcript])[0])

    def classifier(self, label: str) -> SecondOpinion | None:
        """The classifier of `label` on the pool (fitted once per process), None with fewer than two
        labels; it reads the calls' sentence embeddings beside TF-IDF when `label` is in `embedded`."""
        index = self._built_index()
        embeddings = self._embeddings() if label in self.embedded else None
        return self._fitted("classifier", label, lambda labels: SecondOpinion.on_index(index, labels, embeddings))

    def _fitted(
        self,
        kind: str,
        label: str,
        fit: Callable[[list[str | None]], SecondOpinion | None],
        labels: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> SecondOpinion | None:
        """The pool's classifier of `label` of this kind, fitted by `fit` once per process on each
        pool call's `labels(demo)` (by default its `label`)."""
        with self._lock:
            if (kind, label) not in self._classifiers:
                read = labels or (lambda demo: demo.get(label))
                self._classifiers[kind, label] = fit([read(demo) for demo in self.pool])
            return self._classifiers[kind, label]

    def states_location(self, transcript: str) -> float | None:
        """The probability that the caller names the incident's place, from a classifier on the pool
        calls' TF-IDF vectors (a labelled call names one when its gold location is not empty); None
        when the pool carries no locations, or only empty or only named ones."""
        if not self.pool:
            return None
        index = self._built_index()
        classifier = self._fitted(
            "location",
            STATES_LOCATION,
            lambda labels: SecondOpinion.on_index(index, labels),
            lambda demo: location_label(demo.get("location")),
        )
        if classifier is None:
            return None
        return classifier.probabilities_of(self._vector(transcript)).get(STATES_LOCATION, 0.0)

    def probabilities(self, transcript: str, label: str) -> dict[str, float]:
        """The pool classifier's probability of each value of `label` for `transcript` ({} without one)."""
        classifier = self.classifier(label) if self.pool else None
        if classifier is None:
            return {}
        embedding = self._embedding(transcript) if classifier.reads_meaning else None
        return classifier.probabilities_of(self._vector(transcript), embedding)

    def reader_probabilities(self, transcript: str, label: str) -> dict[str, float]:
        """A second reader's probability of each value of `label`: a classifier on the pool's sentence
        embeddings alone, for a program that reads them (`embedded`); {} for any other."""
        if not (self.pool and self.embedded):
            return {}
        embeddings = self._embeddings()
        reader = self._fitted("reader", label, lambda labels: SecondOpinion.on_embeddings(embeddings, labels))
        return reader.probabilities_of(embedding=self._embedding(transcript)) if reader is not None else {}

    def shares(self, transcript: str, label: str, n: int) -> dict[str, float]:
        """`label`'s values among the `n` pool calls most similar to `transcript`, each with its share
        of their summed similarity ({} without a pool)."""
        if not self.pool:
            return {}
        found = self._most_similar(transcript, n)
        return label_shares([(self.pool[i][label], s) for i, s in found if isinstance(self.pool[i].get(label), str)])

    def nearest(self, transcript: str) -> list[tuple[dict[str, Any], float]]:
        """(demo, similarity) of the k most similar pool calls, the most similar last."""
        if not self.active:
            return []
        return self._chosen(self._most_similar(transcript, max(self.k, self.vote)))

    def _chosen(self, found: list[tuple[int, float]]) -> list[tuple[dict[str, Any], float]]:
        chosen = found[: self.k]
        voice = self._voice(found[: self.vote])
        if voice is not None:  # it goes last; the others stay the most similar ones
            chosen = [voice, *[f for f in chosen if f != voice][: self.k - 1]]
        return [(self.pool[i], similarity) for i, similarity in reversed(chosen)]

    def _voice(self, neighbours: list[tuple[int, float]]) -> tuple[int, float] | None:
        """The most similar neighbour whose labels win the neighbours' similarity-weighted vote."""
        entries = [(self.pool[i], (i, s)) for i, s in neighbours if "priority" in self.pool[i]]
        if not entries:
            return None
        winners = {
            label: weighted_vote([(entry.get(label), similarity) for entry, (_, similarity) in entries])
            for label in ("priority", "category")
        }
        for wanted in (("priority", "category"), ("priority",)):
            for entry, found in entries:
                if all(entry.get(label) == winners[label] for label in wanted):
                    return found
        return None

    def _choices(self, transcript: str, neighbours: list[tuple[int, float]]) -> dict[str, tuple[str, ...]]:
        """Per label, the values it may take, the likeliest first (ties: the nearer call's first)."""
        choices = {}
        for label in ("priority", "category"):
            probabilities = self.probabilities(transcript, label) if label in self.classified else {}
            if probabilities:
                totals, share = probabilities, self.classifier_share
            else:
                votes = [(self.pool[i].get(label), s) for i, s in neighbours]
                totals, share = label_totals([(v, s) for v, s in votes if isinstance(v, str)]), self.choice_share
            if totals:
                urgent_share = self.urgent_share if label == "priority" else None
                choices[label] = bounded_labels(totals, share, urgent_share)
        if self.urgent_on_danger and "priority" in choices and danger_phrases(transcript):
            choices["priority"] = ("urgent",)
        return choices

    def neighbourhood(self, transcript: str) -> Neighbourhood:
        """The demos to show for `transcript` (cut to `max_demo_chars`) and the labels its answer may take."""
        if not self.active:
            return Neighbourhood()
        key = ("neighbourhood", transcript, *self.settings().values())
        return self._remembered(key, lambda: self._neighbourhood(transcript))

    def _neighbourhood(self, transcript: str) -> Neighbourhood:
        found = self._most_similar(transcript, max(self.k, self.vote, self.choices))
        demos = [
            dspy.Example(**{**demo, "transcript": clip(demo["transcript"], self.max_demo_chars)})
            for demo, _ in self._chosen(found)
        ]
        choices = self._choices(transcript, found[: self.choices]) if self.choices > 0 else {}
        states = self.states_location(transcript) if self.location_below else None
        if states is not None and states < self.location_below:
            choices["location"] = ("",)  # the caller names no place: the location is left empty
        return Neighbourhood(demos, choices)

    def demos(self, transcript: str) -> list[dspy.Example]:
        """The demos to show for `transcript`, their transcripts cut to `max_demo_chars`."""
        return self.neighbourhood(transcript).demos

    def __deepcopy__(self, memo: dict[int, Any]) -> NearestDemos:
        return NearestDemos(self.pool, **self.settings())  # the index, embeddings and classifiers are rebuilt on use


# The constructor's settings (all but the pool); `dump_state` saves those in use.
SETTINGS = tuple(name for name in inspect.signature(NearestDemos.__init__).parameters if name not in ("self", "pool"))
STATES_LOCATION = "named"  # a pool call whose caller names the place (its gold location is not empty)


def location_label(location: Any) -> str | None:
    """`STATES_LOCATION` or "none", for a labelled call's gold location; None when it carries none."""
    if not isinstance(location, str):
        return None
    return STATES_LOCATION if location.strip() else "none"


def clip(text: str, max_chars: int | None) -> str:
    """`text` cut to at most `max_chars` characters at a word boundary, with " ..." when cut."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[: max(0, max_chars - 4)]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut + " ..."
