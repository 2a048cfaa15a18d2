"""Compile CallTriager and DetailExtractor on the train split, then compare them with the default prompts.

Phases (each logs one line): evaluate the default prompts on the eval split, compile the triager
(metric `triage_metric`), compile the detail extractor (`details_metric`), evaluate the compiled
programs, and save. Nothing is written until every phase has succeeded; the two program files and
the report then replace the old ones atomically, so a failed or interrupted run leaves the
previous optimized programs in place.

Optimizers (`--optimizer`):
  * `labeled` (default): `dspy.LabeledFewShot` over a few short train calls chosen so that the
    demos show every priority and every category evenly (for the extractor, calls with and
    without a location and a subject), with an urgent demo last. No LM calls, so it takes
    seconds; with a weak model whose answers are mostly wrong, demos bootstrapped from its own
    answers would mostly be its few lucky ones.
  * `bootstrap`: `dspy.BootstrapFewShotWithRandomSearch` with a small budget; it evaluates every
    candidate on the train calls, so keep `--max-train` small on the embedded model.
  * `mipro`: `dspy.MIPROv2(auto="light")`; needs `pip install "dspy[optuna]"`; instructions are
    proposed by the reflection model when one is set, else by the task model.
  * `gepa`: `dspy.GEPA(auto="light")` with the feedback metrics; needs a reflection model
    (`--reflection-model` / TRIAGE_REFLECTION_MODEL), a strong one.

The gold labels have no `reasoning` or `summary`, but the programs' ChainOfThought answers do: a
labeled demo without them would be shown with "Not supplied for this particular example", which a
small model copies into its answers. So labeled demos get a short reasoning and summary written
from their gold labels by a template (`triage_demo`, `details_demo`).

How the default was chosen (embedded model, 30 held-out train calls, triage metric / location
match; measured with DSPy's own JSON prompt, before `GrammarJSONAdapter` shortened it, so these
figures are for the choice only: `optimized/report.md` has those of the committed programs):
zero-shot 43% / 53%; 6 demos whose reasoning also stated the priority 30-45% with urgent calls
missed (12 such demos: every call non_urgent, copied from the last demo); 6 demos as below,
urgent last: 52% / 60%, no urgent call missed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from triage.atomic import atomic_write_texts
from triage.demos import (
    details_demo,
    details_features,
    is_urgent,
    select_covering,
    triage_demo,
    triage_features,
)
from triage.errors import ConfigError, TriageError
from triage.evaluation import (
    EvaluationReport,
    Usage,
    concurrency_for,
    evaluate_programs,
    load_labeled,
    metered,
)
from triage.lm import LMSetup, build_lm
from triage.metrics import details_feedback, details_metric, percent, triage_feedback, triage_metric
from triage.nearest_search import NearestChoice, choose_nearest, choose_vote, nearest_program
from triage.optimize_report import OptimizeResult
from triage.programs import CallTriager, DetailExtractor
from triage.settings import Settings, provider_of, resolve_settings
from triage.stages import ExtractDetailsStage, ProgramSource, Stage, TriageStage, program_label

logger = logging.getLogger("triage")

OPTIMIZERS = ("nearest", "labeled", "bootstrap", "mipro", "gepa")
DEFAULT_OPTIMIZER = "nearest"
REPORT_NAME = "report"
BOOTSTRAP_CANDIDATES = 4
OPTIMIZER_RETRIES = 3


class OptimizerUnavailable(TriageError):
    """The chosen optimizer needs something that is not installed or not configured."""


@dataclass(frozen=True)
class OptimizeOptions:
    """What to optimize with and on; the model itself comes from Settings."""

    optimizer: str = DEFAULT_OPTIMIZER
    train: str = "data/train.jsonl"
    dev: str = "data/dev.jsonl"
    test: str = "data/test.jsonl"
    eval_split: str = "dev"
    output_dir: str | None = None  # None: settings.optimized_dir, where the pipeline looks
    max_train: int | None = None
    max_eval: int | None = None
    demos: int = 6
    k_candidates: tuple[int, ...] = (1, 2)  # nearest: demos per call, chosen on the eval split by the metric
    max_demo_chars: int | None = 300  # nearest: demo transcripts are cut to this (prompt length is the cost)
    vote_candidates: tuple[int, ...] = (1, 3, 5, 7, 10)  # nearest: neighbours whose vote picks the last demo
    vote: int = 0  # set by `optimize` from vote_candidates
    choices_candidates: tuple[int, ...] = (5,)  # nearest: neighbours whose labels bound the triager's answer
    # nearest: the share of the neighbours' similarity a priority needs to stay a choice, and urgent's own
    # (at most the share): chosen offline, see choose_priority_bound
    choice_share_candidates: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4, 0.5)
    urgent_share_candidates: tuple[float, ...] = (0.2, 0.25, 0.3, 0.35, 0.4)
    # nearest: below which probability that the caller names a place the location is left empty
    # (0: never), chosen offline, see choose_location_bound
    location_below_candidates: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    seed: int = 0

    @property
    def eval_file(self) -> str:
        return self.test if self.eval_split == "test" else self.dev

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.eval_split not in ("dev", "test"):
            raise ConfigError(f"--eval-split must be dev or test, got {self.eval_split!r}")
        for flag, value in (
            ("--max-train", self.max_train),
            ("--max-eval", self.max_eval),
            ("--demos", self.demos),
            ("--max-demo-chars", self.max_demo_chars),
            *(("--k", k) for k in self.k_candidates),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if not self.k_candidates:
            raise ConfigError("--k needs at least one value")
        if any(n < 0 for n in self.choices_candidates):
            raise ConfigError("--choices must be 0 (off) or more")


def reflection_settings(settings: Settings, model: str) -> Settings:
    """Settings for the reflection model: the task model's endpoint and key when the provider is the
    same, else that provider's own key from the environment or .env."""
    same_provider = provider_of(model) == settings.provider
    flags: dict[str, Any] = settings.model_dump()
    flags.update(
        model=model,
        api_key=settings.api_key if same_provider else None,
        api_base=settings.api_base if same_provider else None,
    )
    return resolve_settings(flags)


# ─── Compiling ───────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Target:
    """One program to compile: its module, stage, metrics and how its labeled demos are written."""

    module_class: type[dspy.Module]
    stage: type[Stage]
    metric: Callable[..., float]
    feedback: Callable[..., dspy.Prediction]
    demo: Callable[[dspy.Example], dspy.Example]
    features: Callable[[dspy.Example], set[Hashable]]
    last: Callable[[dspy.Example], bool] | None = None  # which kind of labeled demo goes last

    @property
    def name(self) -> str:
        """The stage's name, the key of this program in reports and manifests."""
        return self.stage.name


TARGETS = (
    Target(
        CallTriager,
        TriageStage,
        triage_metric,
        triage_feedback,
        triage_demo,
        triage_features,
        last=is_urgent,  # if the model leans toward the last demo, let it lean toward urgent
    ),
    Target(
        DetailExtractor,
        ExtractDetailsStage,
        details_metric,
        details_feedback,
        details_demo,
        details_features,
    ),
)


def check_optimizer_available(settings: Settings, options: OptimizeOptions) -> None:
    """Fail before any work when the optimizer's extra dependency or model is missing."""
    if options.optimizer == "mipro" and importlib.util.find_spec("optuna") is None:
        raise OptimizerUnavailable('--optimizer mipro needs optuna: pip install "dspy[optuna]"')
    if options.optimizer == "gepa" and not settings.reflection_model:
        raise OptimizerUnavailable(
            "--optimizer gepa needs a reflection model: set --reflection-model or TRIAGE_REFLECTION_MODEL "
            "(a strong hosted model, e.g. openai/gpt-4.1)"
        )


def compile_target(
    target: Target,
    options: OptimizeOptions,
    trainset: list[dspy.Example],
    *,
    threads: int,
    reflection_lm: dspy.BaseLM | None,
) -> dspy.Module:
    """The compiled program for one target (runs inside the caller's dspy.context)."""
    student = target.module_class()
    if options.optimizer == "labeled":
        chosen = select_covering(trainset, target.features, options.demos, options.seed, last=target.last)
        chosen_demos = [target.demo(example) for example in chosen]
        return dspy.LabeledFewShot(k=len(chosen_demos)).compile(student, trainset=chosen_demos, sample=False)
    # The searching optimizers take complete demos too: their labeled demos come from this trainset.
    demos = [target.demo(example) for example in trainset]
    max_errors = 10 * len(trainset) + 10  # a bad answer scores 0; it must never stop the search
    if options.optimizer == "bootstrap":
        optimizer = dspy.BootstrapFewShotWithRandomSearch(
            metric=target.metric,
            max_bootstrapped_demos=min(4, options.demos),
            max_labeled_demos=options.demos,
            num_candidate_programs=BOOTSTRAP_CANDIDATES,
            num_threads=threads,
            max_errors=max_errors,
        )
        return optimizer.compile(student, trainset=demos)
    if options.optimizer == "mipro":
        optimizer = dspy.MIPROv2(
            metric=target.metric,
            prompt_model=reflection_lm,
            auto="light",
            max_bootstrapped_demos=min(4, options.demos),
            max_labeled_demos=options.demos,
            num_threads=threads,
            max_errors=max_errors,
            seed=options.seed,
        )
        return optimizer.compile(student, trainset=demos)
    optimizer = dspy.GEPA(
        metric=target.feedback, auto="light", reflection_lm=reflection_lm, num_threads=threads, seed=options.seed
    )
    return optimizer.compile(student, trainset=demos)


def program_json(program: dspy.Module, provenance: dict[str, Any]) -> str:
    """The program state as `Module.save` writes it, plus where it came from."""
    from dspy.utils.saving import get_dependency_versions

    state = program.dump_state()
    state["metadata"] = {"dependency_versions": get_dependency_versions(), "triage": provenance}
    return json.dumps(state, indent=2, ensure_ascii=False) + "\n"


# ─── The run ─────────────────────────────────────────────────────────────────────────────────────


def optimize(
    settings: Settings,
    options: OptimizeOptions,
    *,
    lm_setup: LMSetup | None = None,
    reflection_setup: LMSetup | None = None,
) -> OptimizeResult:
    """Compile both programs on the train split and write them with a before/after report."""
    options.check()
    check_optimizer_available(settings, options)
    started = time.monotonic()
    output_dir = Path(options.output_dir or settings.optimized_dir)
    trainset = load_labeled(options.train, options.max_train)
    evalset = load_labeled(options.eval_file, options.max_eval)
    setup = lm_setup or build_lm(settings, num_retries=OPTIMIZER_RETRIES)
    reflection_lm = None
    if reflection_setup is None and settings.reflection_model and options.optimizer in ("mipro", "gepa"):
        reflection_setup = build_lm(
            reflection_settings(settings, settings.reflection_model), num_retries=OPTIMIZER_RETRIES
        )
    if reflection_setup is not None:
        reflection_lm = reflection_setup.lm
    threads = concurrency_for(settings)
    logger.info(
        "optimize: model %s, optimizer %s, %d train calls, %d %s calls -> %s",
        settings.model,
        options.optimizer,
        len(trainset),
        len(evalset),
        options.eval_split,
        output_dir,
    )

    default = {t.name: ProgramSource(None, "default prompts") for t in TARGETS}
    train_pool = [example.toDict() for example in trainset]  # the baselines' labelled calls

    def evaluated(programs: dict[str, ProgramSource], kind: str) -> EvaluationReport:
        return evaluate_programs(
            settings,
            evalset,
            options.eval_file,
            programs,
            lm_setup=setup,
            title=lambda name: f"{kind} {name}",
            baseline_pool=train_pool,
        )

    logger.info("[1/5] evaluating the default prompts on %d %s calls", len(evalset), options.eval_split)
    before = evaluated(default, "default")

    compiled: dict[str, dspy.Module] = {}
    usage: dict[str, Usage] = {}
    chosen: dict[str, NearestChoice] = {}
    notes: list[str] = []
    # The saved programs' pool: train, with dev's calls added when dev is the eval split (never test's).
    labelled = trainset + load_labeled(options.dev) if options.eval_split == "dev" else trainset
    if options.optimizer == "nearest":
        vote, by_vote = choose_vote(trainset, evalset, options.vote_candidates)
        options = dataclasses.replace(options, vote=vote)
        tried = ", ".join(f"{n}: {percent(score)}" for n, score in by_vote.items())
        notes.append(
            f"The last demo is chosen by the vote of the {vote} most similar calls (their vote alone, {tried})"
        )
    for step, target in enumerate(TARGETS, 2):
        logger.info(
            "[%d/5] compiling %s with %s on %d train calls",
            step,
            target.module_class.__name__,
            options.optimizer,
            len(trainset),
        )
        phase_started = time.monotonic()
        # DSPy's optimizers print their progress: keep stdout for the command's one-line summary.
        with (
            metered() as spent,
            dspy.context(lm=setup.lm, adapter=setup.adapter()),
            contextlib.redirect_stdout(sys.stderr),
        ):
            if options.optimizer == "nearest":
                chosen[target.name], tried_scores, bound_notes = choose_nearest(
                    target, options, trainset, evalset, settings, setup, labelled
                )
                notes += bound_notes
                compiled[target.name] = nearest_program(
                    target, trainset, chosen[target.name], options.max_demo_chars, options.vote
                )
                tried = "; ".join(f"{c.describe()}: {percent(score)}" for c, score in tried_scores.items())
                notes.append(
                    f"{target.name}: nearest demos, {chosen[target.name].describe()} (metric on eval: {tried})"
                )
            else:
                compiled[target.name] = compile_target(
                    target, options, trainset, threads=threads, reflection_lm=reflection_lm
                )
        usage[target.name] = spent
        logger.info(
            "      %s compiled in %.0fs: %d demos, %s",
            target.module_class.__name__,
            time.monotonic() - phase_started,
            sum(len(p.demos) for p in compiled[target.name].predictors()),
            spent.describe(),
        )

    provenance = {
        "optimizer": options.optimizer,
        "model": settings.model,
        "train": options.train,
        "train_calls": len(trainset),
    }
    texts = {t.name: program_json(compiled[t.name], provenance) for t in TARGETS}
    # Labelled as `ProgramSource.load` will label the files once written (UTF-8, like atomic_write_texts),
    # unless the saved pool will differ from the evaluated one (then no file holds these bytes).
    pool_grows = options.optimizer == "nearest" and options.eval_split == "dev"

    def label(target: Target) -> str:
        if pool_grows:
            return f"{target.stage.program_file} with the train calls as its pool (saved with dev's added)"
        return program_label(output_dir / target.stage.program_file, texts[target.name].encode("utf-8"))

    optimized = {t.name: ProgramSource(json.loads(texts[t.name]), label(t)) for t in TARGETS}
    logger.info("[4/5] evaluating the optimized programs on %d %s calls", len(evalset), options.eval_split)
    after = evaluated(optimized, "optimized")

    if pool_grows:
        # Tuned and scored with train as the pool; the saved programs draw on dev's labelled calls too.
        pool = labelled
        for target in TARGETS:
            program = nearest_program(target, pool, chosen[target.name], options.max_demo_chars, options.vote)
            texts[target.name] = program_json(program, {**provenance, "pool": [options.train, options.dev]})
        saved = "; ".join(
            program_label(output_dir / t.stage.program_file, texts[t.name].encode("utf-8")) for t in TARGETS
        )
        notes.append(
            f"The figures above use the {len(trainset)} train calls as the demo pool; the saved programs' pool "
            f"adds {options.dev} ({len(pool)} labelled calls): {saved}."
        )
    if options.optimizer == "labeled":
        notes.append(
            "Demo `reasoning` and `summary` are written from the gold labels by a template "
            "(the labeled data has neither); the triager's last demo is an urgent call."
        )
    result = OptimizeResult(
        files=[],
        before=before,
        after=after,
        optimizer_usage=usage,
        seconds=time.monotonic() - started,
        options=options,
        notes=notes,
    )
    files = {output_dir / t.stage.program_file: texts[t.name] for t in TARGETS}
    report_md, report_json = output_dir / f"{REPORT_NAME}.md", output_dir / f"{REPORT_NAME}.json"
    result.files = [*files, report_md, report_json]
    logger.info("[5/5] saving %s", ", ".join(str(f) for f in result.files))
    files[report_md] = result.to_markdown()
    files[report_json] = json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
    atomic_write_texts(files)
    return result
