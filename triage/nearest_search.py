"""The `nearest` optimizer's choices: which neighbours vote, how many demos, and how the labels are bounded.

Each is chosen on the eval split with train as the demo pool (no evaluated call is shown itself):
the vote and the bound's share offline from the labels alone, k and whether to bound with the LM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dspy

from triage.demos import nearest_pool
from triage.evaluation import run_module
from triage.lm import LMSetup
from triage.metrics import percent
from triage.programs import PRIORITIES, NearestDemos, literal_choices
from triage.retrieval import SimilarCalls, weighted_vote
from triage.settings import Settings
from triage.stages import ProgramSource

if TYPE_CHECKING:
    from triage.optimize import OptimizeOptions, Target

logger = logging.getLogger("triage")


@dataclass(frozen=True)
class NearestChoice:
    """The per-call demo settings `optimize` chose for one program (see `NearestDemos`)."""

    k: int
    choices: int = 0
    choice_share: float = 0.0

    def describe(self) -> str:
        bound = f", choices={self.choices}" + (f" (share >= {self.choice_share:g})" if self.choice_share else "")
        return f"k={self.k}" + (bound if self.choices else "")


def nearest_program(
    target: Target, examples: list[dspy.Example], chosen: NearestChoice, max_demo_chars: int | None, vote: int = 0
) -> dspy.Module:
    """The target's module with `examples` as its nearest-demo pool."""
    program = target.module_class()
    state = {
        "k": chosen.k,
        "max_demo_chars": max_demo_chars,
        "vote": vote,
        "choices": chosen.choices,
        "choice_share": chosen.choice_share,
    }
    program.nearest.load_state({**state, "pool": nearest_pool(examples, target.demo)})
    return program


def has_choices(target: Target) -> bool:
    """Whether the target answers a field with a fixed set of labels, which neighbours can bound."""
    predictor = target.module_class().predictors()[0]
    return any(literal_choices(field.annotation) for field in predictor.signature.output_fields.values())


def choose_vote(
    trainset: list[dspy.Example], evalset: list[dspy.Example], candidates: tuple[int, ...]
) -> tuple[int, dict[int, float]]:
    """How many neighbours vote for the last demo's labels: the count whose vote alone (no LM) gets
    the most eval priorities right with train as the pool. Ties go to fewer neighbours."""
    index = SimilarCalls([example.transcript for example in trainset])
    scores = {}
    for n in sorted(candidates):
        right = 0
        for example in evalset:
            votes = [(trainset[i].priority, s) for i, s in index.most_similar(example.transcript, n)]
            right += weighted_vote(votes) == example.priority
        scores[n] = right / len(evalset)
    return max(scores, key=lambda n: (scores[n], -n)), scores


MIN_URGENT_RECALL = 0.95


def choose_choice_share(
    trainset: list[dspy.Example], evalset: list[dspy.Example], n: int, candidates: tuple[float, ...]
) -> tuple[float, dict[float, float]]:
    """The smallest share of the `n` neighbours' similarity a priority needs to stay a choice.

    Chosen without the LM, for the LM that leans hardest toward urgent: it is assumed to take the
    most urgent priority left. Of the shares whose eval urgent recall stays >= 0.95 under that
    assumption, the one with the best accuracy (ties: the smaller share, more left to the model).
    """
    probe = NearestDemos(
        [{"transcript": e.transcript, "priority": e.priority, "category": e.category} for e in trainset],
        k=1,
        choices=n,
    )
    scores: dict[float, float] = {}
    for share in sorted(set(candidates)):
        probe.choice_share = share
        right = urgent = urgent_kept = 0
        for example in evalset:
            allowed = probe.neighbourhood(example.transcript).choices.get("priority", PRIORITIES)
            answer = min(allowed, key=PRIORITIES.index)
            right += answer == example.priority
            urgent += example.priority == "urgent"
            urgent_kept += example.priority == "urgent" and answer == "urgent"
        if urgent == 0 or urgent_kept / urgent >= MIN_URGENT_RECALL:
            scores[share] = right / len(evalset)
    if not scores:
        return 0.0, {}
    return max(scores, key=lambda share: (scores[share], -share)), scores


def choose_nearest(
    target: Target,
    options: OptimizeOptions,
    trainset: list[dspy.Example],
    evalset: list[dspy.Example],
    settings: Settings,
    setup: LMSetup,
) -> tuple[NearestChoice, dict[NearestChoice, float]]:
    """The nearest-demo settings with the best mean metric on `evalset`: first the number of demos
    (of `options.k_candidates`), then, for a program with labels, whether the neighbours' labels
    bound its answer (`options.choices_candidates`, against none).

    The pool is the train split only, so no evaluated call is shown itself. Ties go to the smaller
    k (the shorter prompt) and to no bound.
    """
    scores: dict[NearestChoice, float] = {}

    def score(chosen: NearestChoice) -> float:
        program = nearest_program(target, trainset, chosen, options.max_demo_chars, options.vote)
        source = ProgramSource(program.dump_state(), f"nearest demos, {chosen.describe()}")
        run = run_module(target.stage, settings, setup, source, evalset, title=f"{target.name}, {chosen.describe()}")
        scores[chosen] = sum(
            target.metric(example, prediction) if prediction is not None else 0.0
            for example, prediction in zip(evalset, run.predictions, strict=True)
        ) / len(evalset)
        logger.info("      %s with %s: metric %s", target.name, chosen.describe(), percent(scores[chosen]))
        return scores[chosen]

    def best(candidates: list[NearestChoice]) -> NearestChoice:
        return max(candidates, key=lambda c: (scores[c], -c.k, -c.choices, c.choice_share))

    by_k = [NearestChoice(k) for k in sorted(options.k_candidates)]
    for chosen in by_k:
        score(chosen)
    k = best(by_k).k
    bounded = [
        NearestChoice(k, n, choose_choice_share(trainset, evalset, n, options.choice_share_candidates)[0])
        for n in sorted(set(options.choices_candidates))
        if n > 0
    ]
    if has_choices(target):
        for chosen in bounded:
            score(chosen)
    return best(list(scores)), scores
