"""What trivial answers score on the same calls, so an LM's figures are never read alone.

* always urgent: every call urgent, with the pool's most common category;
* nearest labelled call: the labels of the single most similar call in the pool (TF-IDF cosine);
* second opinion: the classifier the review queue compares answers with (`SecondOpinion`).

The pool is the labelled calls a program was given (its nearest-demo pool), never the calls scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from triage.metrics import Scores, score_calls
from triage.retrieval import SecondOpinion, SimilarCalls

URGENT = "urgent"


def baseline_answers(transcripts: Sequence[str], pool: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, str]]]:
    """Each baseline's {priority, category} answer for every transcript."""
    texts = [demo["transcript"] for demo in pool]
    commonest = Counter(demo["category"] for demo in pool).most_common(1)[0][0]
    index = SimilarCalls(texts)
    nearest = [pool[index.most_similar(t, 1)[0][0]] for t in transcripts]
    opinions = {name: SecondOpinion.from_pool(pool, name) for name in ("priority", "category")}

    def second_opinion(transcript: str) -> dict[str, str]:
        answer = {}
        for name, model in opinions.items():
            probabilities = model.probabilities(transcript)
            answer[name] = max(probabilities, key=probabilities.__getitem__)
        return answer

    return {
        "always urgent": [{"priority": URGENT, "category": commonest} for _ in transcripts],
        "nearest labelled call": [{"priority": n["priority"], "category": n["category"]} for n in nearest],
        "second opinion (TF-IDF classifier)": [second_opinion(t) for t in transcripts],
    }


def score_baselines(gold: Sequence[Any], pool: Sequence[dict[str, Any]]) -> dict[str, Scores]:
    """Scores of every baseline on `gold` (examples with a transcript and labels); {} without a pool."""
    labelled = [demo for demo in pool if demo.get("priority") and demo.get("category") and demo.get("transcript")]
    if len({demo["priority"] for demo in labelled}) < 2 or len({demo["category"] for demo in labelled}) < 2:
        return {}
    answers = baseline_answers([g["transcript"] for g in gold], labelled)
    return {name: score_calls(gold, predictions) for name, predictions in answers.items()}
