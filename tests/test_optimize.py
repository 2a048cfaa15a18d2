"""`optimize` end to end against the fake provider: both programs and the report, written atomically."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest

import triage.atomic
import triage.demos
import triage.nearest_search
import triage.optimize
from tests.fake_provider import FakeProvider, expected_answer, format_content, parse_request
from triage.cli import main
from triage.demos import caller_summary, details_demo, is_urgent, select_covering, triage_demo, triage_features
from triage.errors import TriageError
from triage.evaluation import ModuleRun, load_labeled
from triage.grounding import MAX_SUMMARY_WORDS
from triage.nearest_search import (
    LOST_PLACE_COST,
    MIN_URGENT_RECALL,
    LocationFigures,
    NearestChoice,
    PriorityBound,
    _location_note,
    choose_location_bound,
    choose_nearest,
    choose_priority_bound,
)
from triage.optimize import OptimizeOptions, OptimizerUnavailable, check_optimizer_available, optimize
from triage.programs import CATEGORIES, PRIORITIES, CallTriager, DetailExtractor
from triage.settings import Settings
from triage.stages import ProgramSource

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "data" / "train.jsonl")
DEV = str(ROOT / "data" / "dev.jsonl")
OLD = {
    "triager.json": '{"old": "triager"}\n',
    "detail_extractor.json": '{"old": "extractor"}\n',
    "report.md": "# old report\n",
    "report.json": "{}\n",
}


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


def fake_settings(provider: FakeProvider) -> Settings:
    return Settings(
        model="openai/fake", api_base=provider.url, cache=False, validation_attempts=1, max_retries=0, concurrency=4
    )


def options(tmp_path: Path, **overrides) -> OptimizeOptions:
    values = {
        "train": TRAIN,
        "dev": DEV,
        "output_dir": str(tmp_path / "optimized"),
        "max_train": 40,
        "max_eval": 4,
    } | overrides
    return OptimizeOptions(**values)


def test_labeled_optimize_writes_both_programs_and_the_report(provider, tmp_path):
    result = optimize(fake_settings(provider), options(tmp_path, optimizer="labeled"))
    out = tmp_path / "optimized"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # not mkstemp's 0600
    assert sorted(p.name for p in out.iterdir()) == [
        "detail_extractor.json",
        "report.json",
        "report.md",
        "triager.json",
    ]
    assert result.files == [out / "triager.json", out / "detail_extractor.json", out / "report.md", out / "report.json"]

    triager, extractor = CallTriager(), DetailExtractor()
    triager.load_state(ProgramSource.load(out, "triager.json").state)
    extractor.load_state(ProgramSource.load(out, "detail_extractor.json").state)
    demos = triager.triage.predict.demos
    assert len(demos) == 6 and len(extractor.extract.predict.demos) == 6
    # The labeled optimizer's demos show every priority and every category, each demo complete.
    assert {d["priority"] for d in demos} == set(PRIORITIES) and {d["category"] for d in demos} == set(CATEGORIES)
    assert all(d["reasoning"] and d["summary"] for d in demos)

    lm = dspy.LM("openai/fake", api_base=provider.url, api_key="none", cache=False)
    transcript = "Caller: smoke is pouring out of the garage at 12 Elm Street."
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        answer, details = triager(transcript=transcript), extractor(transcript=transcript)
    assert answer.priority == expected_answer(transcript)["priority"]
    assert details.location == expected_answer(transcript)["location"]

    markdown = (out / "report.md").read_text()
    assert "- Optimizer: `labeled` (6 demos per program)" in markdown
    assert f"- Train: `{TRAIN}` (first 40 calls)" in markdown
    assert f"- Evaluated on: `{DEV}` (4 calls, the first 4 of the file)" in markdown
    assert "| metric | unoptimized | optimized |" in markdown
    assert "| LM calls (triage / extract_details) | 4 / 4 | 4 / 4 |" in markdown
    assert "| triage | 0 | 0 | 0 |" in markdown  # LabeledFewShot makes no LM call
    assert "## Priority confusion (optimized)" in markdown
    data = json.loads((out / "report.json").read_text())
    assert data["optimizer"] == "labeled" and data["model"] == "openai/fake"
    assert data["unoptimized"]["n"] == data["optimized"]["n"] == 4
    assert data["unoptimized"]["programs"]["triage"] == "default prompts"
    assert data["optimized"]["programs"]["triage"] == ProgramSource.load(out, "triager.json").label
    assert data["optimizer_usage"]["triage"] == {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    # Against the fake provider demos change nothing: same answers before and after.
    assert data["optimized"]["scores"]["priority_accuracy"] == data["unoptimized"]["scores"]["priority_accuracy"]
    assert "priority" in result.line() and "->" in result.line()


def test_bootstrap_optimize_counts_the_optimizers_lm_calls(provider, tmp_path):
    result = optimize(fake_settings(provider), options(tmp_path, optimizer="bootstrap", max_train=4, max_eval=2))
    assert result.optimizer_usage["triage"].calls > 0 and result.optimizer_usage["triage"].prompt_tokens > 0
    state = ProgramSource.load(tmp_path / "optimized", "triager.json").state
    CallTriager().load_state(state)
    assert state["metadata"]["triage"]["optimizer"] == "bootstrap"


def test_nearest_optimize_chooses_k_on_dev_and_saves_a_pool_of_train_and_dev(provider, tmp_path):
    optimize(fake_settings(provider), options(tmp_path, k_candidates=(1, 2), max_eval=3))
    out = tmp_path / "optimized"
    triager, extractor = CallTriager(), DetailExtractor()
    triager.load_state(ProgramSource.load(out, "triager.json").state)
    extractor.load_state(ProgramSource.load(out, "detail_extractor.json").state)
    train, dev = load_labeled(TRAIN, 40), load_labeled(DEV)
    # Against the fake provider every k scores the same: the smaller one wins the tie.
    assert triager.nearest.k == extractor.nearest.k == 1
    assert triager.nearest.choices == 0  # a bound that answers no better is not kept
    assert [d["call_id"] for d in triager.nearest.pool] == [e.call_id for e in train + dev]
    assert triager.triage.predict.demos == []  # no fixed demos: each call gets its own
    # The demos for a call are its most similar labelled calls, the most similar last.
    [(demo, similarity)] = triager.nearest.nearest(dev[5].transcript)
    assert demo["call_id"] == dev[5].call_id and similarity == pytest.approx(1.0)
    assert demo["reasoning"] and demo["summary"] and demo["priority"] == dev[5].priority
    markdown = (out / "report.md").read_text()
    assert "- Optimizer: `nearest`" in markdown
    # Every k was tried with the bound, then the best k without it (kept: the fake answers no better bounded).
    assert "triage: nearest demos, k=1 (metric on eval: k=1, choices=5" in markdown
    assert "; k=2, choices=5" in markdown and "; k=1: " in markdown
    # The location bound too (chosen out of fold without the LM), then the best k without it.
    assert "extract_details: nearest demos, k=1 (metric on eval: k=1, no location below p=" in markdown
    assert "; k=2, no location below p=" in markdown and "; k=1: " in markdown.split("extract_details: nearest")[1]
    assert "extract_details: the location bound, chosen in 10-fold cross-validation on 113 labelled calls" in markdown
    assert extractor.nearest.location_below == 0  # the fake answers no better bounded
    assert "choices" not in markdown.split("extract_details: nearest demos")[1].split("\n")[0]  # no labels to bound
    assert f"the saved programs' pool adds {DEV} ({len(train) + len(dev)} labelled calls)" in markdown
    # The saved files are named by their own sha256; the programs scored on dev (train pool) are no file.
    assert ProgramSource.load(out, "triager.json").label in markdown
    assert ProgramSource.load(out, "detail_extractor.json").label in markdown
    scored = json.loads((out / "report.json").read_text())["optimized"]["programs"]["triage"]
    assert scored == "triager.json with the train calls as its pool (saved with dev's added)"
    assert "| nearest labelled call |" in markdown and "| always urgent |" in markdown


FIRST_ALLOWED = re.compile(r"^\{(\w+)\}.*one of: ([\w;\s]+)$", re.MULTILINE)


def first_allowed_labels(body: dict) -> str:
    """A reply that takes, for each field with a fixed set of labels, the first one the prompt allows."""
    request = parse_request(body)
    first = {name: values.split(";")[0].strip() for name, values in FIRST_ALLOWED.findall(request.system)}
    answer = expected_answer(request.answer_key)
    return format_content({name: first.get(name, answer.get(name, "n/a")) for name in request.fields}, False)


def test_nearest_optimize_keeps_the_labelled_calls_bound_when_it_scores_better(tmp_path):
    # The first allowed label is "urgent" without a bound and the labelled calls' likeliest label with it.
    with FakeProvider(handler=first_allowed_labels) as provider:
        optimize(fake_settings(provider), options(tmp_path, k_candidates=(1,), choices_candidates=(3,), max_eval=12))
    triager, extractor = CallTriager(), DetailExtractor()
    triager.load_state(ProgramSource.load(tmp_path / "optimized", "triager.json").state)
    extractor.load_state(ProgramSource.load(tmp_path / "optimized", "detail_extractor.json").state)
    assert (triager.nearest.k, triager.nearest.choices) == (1, 3)
    assert extractor.nearest.choices == 0
    report = json.loads((tmp_path / "optimized" / "report.json").read_text())
    share, urgent_share = triager.nearest.choice_share, triager.nearest.urgent_share
    assert share in OptimizeOptions().choice_share_candidates
    assert urgent_share in (*OptimizeOptions().urgent_share_candidates, share) and urgent_share <= share
    assert set(triager.nearest.classified) <= {"priority", "category"} and triager.nearest.classifier_share == share
    danger = triager.nearest.urgent_on_danger
    bound = NearestChoice(1, 3, share, triager.nearest.classified, urgent_share, urgent_on_danger=danger).describe()
    assert bound.startswith("k=1, choices=3")
    notes = "\n".join(report["notes"])
    assert f"triage: nearest demos, {bound} (metric on eval: {bound}: " in notes and "; k=1: " in notes
    # The priority bound was chosen leave-one-out on train + dev (the saved pool), and says so.
    pool = len(triager.nearest.pool)
    assert f"chosen leave-one-out on {pool} labelled calls" in notes
    source = "classifier" if "priority" in triager.nearest.classified else "neighbours"
    assert f"{PriorityBound(source, share, urgent_share, danger).describe()} (urgent recall " in notes


def write_old_files(out: Path) -> None:
    out.mkdir(parents=True)
    for name, text in OLD.items():
        (out / name).write_text(text)


def assert_old_files_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(OLD)  # and no temporary file left behind
    for name, text in OLD.items():
        assert (out / name).read_text() == text


def test_a_failure_while_compiling_leaves_the_old_programs(provider, tmp_path, monkeypatch):
    real_compile = triage.optimize.compile_target

    def compile_then_fail(target, *args, **kwargs):
        if target.name == "extract_details":
            raise RuntimeError("the optimizer crashed")
        return real_compile(target, *args, **kwargs)

    monkeypatch.setattr(triage.optimize, "compile_target", compile_then_fail)
    out = tmp_path / "optimized"
    write_old_files(out)
    with pytest.raises(RuntimeError, match="the optimizer crashed"):
        optimize(fake_settings(provider), options(tmp_path, optimizer="labeled"))
    assert_old_files_untouched(out)


def test_a_failure_while_writing_leaves_the_old_files_and_no_temporary_file(provider, tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync_fails_on_the_third_file(descriptor: int) -> None:
        calls.append(descriptor)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(triage.atomic.os, "fsync", fsync_fails_on_the_third_file)
    out = tmp_path / "optimized"
    write_old_files(out)
    with pytest.raises(TriageError, match=r"could not write .*report\.md: No space left on device"):
        optimize(fake_settings(provider), options(tmp_path))
    assert len(calls) == 3
    assert_old_files_untouched(out)


def test_select_covering_shows_every_label_evenly_with_an_urgent_demo_last():
    train = load_labeled(TRAIN)
    chosen = select_covering(train, triage_features, 6, last=is_urgent)
    assert {e.priority for e in chosen} == set(PRIORITIES) and {e.category for e in chosen} == set(CATEGORIES)
    assert chosen[-1].priority == "urgent"
    assert all(len(e.transcript.split()) <= triage.demos.MAX_DEMO_WORDS for e in chosen)
    assert select_covering(train, triage_features, 6, last=is_urgent) == chosen  # reproducible
    twelve = select_covering(train, triage_features, 12)
    assert Counter(e.priority for e in twelve) == {"urgent": 4, "non_urgent": 4, "not_an_emergency": 4}
    assert Counter(e.category for e in twelve) == dict.fromkeys(CATEGORIES, 2)
    assert len(select_covering(train[:3], triage_features, 6)) == 3


def test_labeled_demos_are_complete_and_built_from_the_gold_labels():
    example = dspy.Example(
        transcript="Dispatcher: 911? Caller: Hi, yeah, my family is on the roof, the water is rising fast!",
        priority="urgent",
        category="fire",
        location="12 Elm St",
        subject_description="family of four on the roof",
    ).with_inputs("transcript")
    demo = triage_demo(example)
    assert demo.summary == "my family is on the roof, the water is rising fast"  # the caller's words
    assert demo.reasoning == "The call is about family of four on the roof; category fire."
    assert (demo.priority, demo.category) == ("urgent", "fire")
    details = details_demo(example)
    assert details.reasoning == "The location and the person are quoted from the call."
    assert (details.location, details.subject_description) == ("12 Elm St", "family of four on the roof")
    empty = dspy.Example(
        transcript="t", priority="not_an_emergency", category="other", location="", subject_description=""
    )
    assert triage_demo(empty).summary == "t"
    assert triage_demo(empty).reasoning == "The call is about a matter with no one at risk; category other."


@pytest.mark.parametrize(
    ("transcript", "summary"),
    [
        # the first turn not by the dispatcher, without its greeting
        (
            "Dispatcher: 911, what's your emergency? Caller: Hi. My kitchen is on fire, it's spreading!",
            "My kitchen is on fire, it's spreading",
        ),
        # a turn too short to say anything is passed over
        (
            "Caller: Hello? Dispatcher: 911. Caller: There's a man with a knife outside my door. Hurry.",
            "There's a man with a knife outside my door. Hurry",
        ),
        # a long turn: cut at the last sentence end within MAX_SUMMARY_WORDS words
        (
            "Caller: My neighbour's dog has been barking since six this morning without a break. "
            "Nobody is home over there and I work nights, so I really need some sleep before my shift starts.",
            "My neighbour's dog has been barking since six this morning without a break",
        ),
        # ... or at a later comma when the only sentence end is early
        (
            "Caller: I'm sorry. I'm at my house, 14 Ridgeline Drive, my ex-husband just left but he said he "
            "was coming back to burn the house down with me in it",
            "I'm sorry. I'm at my house, 14 Ridgeline Drive",
        ),
        ("no speakers here at all", "no speakers here at all"),
        ("Dispatcher: 911? Dispatcher: Hello?", "Dispatcher: 911? Dispatcher: Hello"),  # nobody else: the transcript
    ],
)
def test_caller_summary_is_the_callers_opening_words_as_a_span(transcript, summary):
    assert caller_summary(transcript) == summary
    assert summary in transcript  # a span, as the embedded model's grammar allows
    assert len(re.findall(r"\w+", summary)) <= MAX_SUMMARY_WORDS


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_mipro_without_optuna_says_how_to_install_it(tmp_path):
    with pytest.raises(OptimizerUnavailable, match=r'pip install "dspy\[optuna\]"'):
        optimize(Settings(), options(tmp_path, optimizer="mipro"))


def test_gepa_without_a_reflection_model_is_refused_before_any_work(tmp_path):
    with pytest.raises(OptimizerUnavailable, match="TRIAGE_REFLECTION_MODEL"):
        optimize(Settings(), options(tmp_path, optimizer="gepa"))
    assert not (tmp_path / "optimized").exists()


def test_gepa_takes_its_reflection_model_from_the_settings(monkeypatch):
    """TRIAGE_REFLECTION_MODEL is a setting: whatever source gave it, the check sees it (precedence: test_settings)."""
    check_optimizer_available(Settings(reflection_model="openai/strong"), OptimizeOptions(optimizer="gepa"))
    monkeypatch.setenv("TRIAGE_REFLECTION_MODEL", "openai/from-env")
    check_optimizer_available(Settings(), OptimizeOptions(optimizer="gepa"))


def test_cli_optimize_writes_the_programs_and_prints_one_line(provider, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "programs"
    caplog.set_level(logging.INFO, logger="triage")
    code = main(
        [
            "optimize",
            "--model",
            "openai/fake",
            "--api-base",
            provider.url,
            "--train",
            TRAIN,
            "--dev",
            DEV,
            "--max-train",
            "30",
            "--max-eval",
            "3",
            "--output-dir",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out / 'triager.json'}, {out / 'detail_extractor.json'}")
    assert "[1/5] evaluating the default prompts on 3 dev calls" in caplog.text
    assert "[5/5] saving" in caplog.text
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--optimizer", "gepa"],
            "error: --optimizer gepa needs a reflection model: set --reflection-model or TRIAGE_REFLECTION_MODEL",
        ),
        (
            ["--optimizer", "magic"],
            "error: --optimizer must be one of nearest, labeled, bootstrap, mipro, gepa, got 'magic'",
        ),
        (["--max-train", "0"], "error: --max-train must be at least 1, got 0"),
        (["--train", "nowhere.jsonl"], "error: labeled file nowhere.jsonl does not exist"),
    ],
)
def test_cli_optimize_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


@pytest.mark.parametrize(("gain", "chosen_k"), [(1, 1), (2, 2)])
def test_a_second_demo_is_kept_only_if_it_earns_more_than_one_eval_call(monkeypatch, gain, chosen_k):
    """Each demo costs the embedded model about a second per call: k=2 must beat k=1 by more than one call.
    (3 then 4 calls right of 10: 0.4 - 0.1 > 0.3 in floating point, a tie in calls.)"""
    target = next(t for t in triage.optimize.TARGETS if t.name == "extract_details")
    train, evalset = load_labeled(TRAIN, 20), load_labeled(DEV, 10)

    def run_module(stage, settings, setup, source, examples, title=""):
        right = 3 + (gain if source.state["nearest_demos"]["k"] == 2 else 0)
        answers = [
            {"location": e.location, "subject_description": e.subject_description}
            if i < right
            else {"location": "Nowhere Lane 99", "subject_description": "a purple giraffe"}
            for i, e in enumerate(examples)
        ]
        return ModuleRun(program=source.label, predictions=answers)

    monkeypatch.setattr(triage.nearest_search, "run_module", run_module)
    chosen, scores, _ = choose_nearest(
        target, OptimizeOptions(k_candidates=(1, 2)), train, evalset, None, None, train + evalset
    )
    assert scores[NearestChoice(2)] - scores[NearestChoice(1)] == pytest.approx(gain / 10)
    assert chosen == NearestChoice(chosen_k)


def test_the_priority_bound_is_chosen_leave_one_out_for_urgent_recall():
    fires = ["house fire flames smoke", "kitchen fire flames spreading", "garage fire smoke flames", "car fire flames"]
    toast = ["smoke alarm kitchen burnt toast", "smoke alarm toast again kitchen", "alarm beeping burnt toast smoke"]
    labelled = [dspy.Example(transcript=t, priority="urgent") for t in fires]
    labelled += [dspy.Example(transcript=t, priority="non_urgent") for t in [*toast, "burnt toast kitchen alarm"]]
    labelled.append(dspy.Example(transcript="smoke alarm kitchen toast, fire flames", priority="urgent"))
    bound, figures = choose_priority_bound(labelled, 3, (0.5,), (0.1, 0.2, 0.3, 0.4))
    neighbours = {b: f for b, f in figures.items() if b.source == "neighbours"}
    by_neighbours = {(b.share, b.urgent_share): f for b, f in neighbours.items() if not b.danger}
    # Its own label would keep every urgent call at any share: the mixed call is judged by the others,
    # mostly toast, so one share for every label loses it.
    assert by_neighbours[(0.5, 0.5)].urgent_recall == pytest.approx(4 / 5)
    assert by_neighbours[(0.5, 0.2)].urgent_recall == 1.0 >= MIN_URGENT_RECALL
    assert by_neighbours[(0.5, 0.1)].urgent_recall == 1.0
    assert by_neighbours[(0.5, 0.1)].priority < by_neighbours[(0.5, 0.2)].priority
    # Each bound is also scored with urgent the only choice whenever the caller's words describe
    # danger: the mixed call says "flames", so one share for every label keeps it that way.
    on_danger = {(b.share, b.urgent_share): f for b, f in neighbours.items() if b.danger}
    assert on_danger[(0.5, 0.5)].urgent_recall == 1.0 and on_danger[(0.5, 0.5)].priority == 1.0
    # The classifier (fitted on the others) is scored beside them; the most accurate bound that keeps
    # every urgent call wins.
    assert {b.source for b in figures} == {"neighbours", "classifier"}
    meeting = [b for b, f in figures.items() if f.urgent_recall >= MIN_URGENT_RECALL]
    assert figures[bound].urgent_recall >= MIN_URGENT_RECALL
    assert figures[bound].priority == max(figures[b].priority for b in meeting)


def test_without_a_classifier_for_every_call_the_priority_bound_is_the_neighbours():
    labelled = [dspy.Example(transcript=f"house fire flames {i}", priority="urgent") for i in range(4)]
    labelled.append(dspy.Example(transcript="burnt toast", priority="non_urgent"))  # alone with its label
    bound, figures = choose_priority_bound(labelled, 3, (0.5,), (0.3,))
    assert bound.source == "neighbours" and {b.source for b in figures} == {"neighbours"}


PLACES = [
    "fire at 12 Elm Street",
    "crash on Main Street by the bridge",
    "dog loose at 40 Oak Avenue",
    "smoke at 9 Elm Road",
]
NO_PLACE = ["sorry wrong number", "my mistake, wrong number, sorry", "sorry, dialled by mistake", "wrong number sorry"]


def places_and_none() -> list[dspy.Example]:
    calls = [dspy.Example(transcript=t, location=t.split(" at ")[-1], subject_description="") for t in PLACES * 3]
    return calls + [dspy.Example(transcript=t, location="", subject_description="") for t in NO_PLACE * 3]


def test_the_location_bound_is_chosen_out_of_fold_and_a_lost_place_costs_three():
    threshold, figures = choose_location_bound(places_and_none(), (0.2, 0.5, 0.8, 0.99))
    # Every call is judged by a classifier that never saw it: the calls naming no place fall below 0.5.
    assert figures[0.5] == LocationFigures(12, 0) and threshold == 0.5
    assert figures[0.99].emptied_right == 12 and figures[0.99].emptied_wrong == 12  # everything emptied
    assert figures[0.99].gain == 12 - LOST_PLACE_COST * 12 < figures[0.5].gain
    assert choose_location_bound(places_and_none(), (0.99,))[0] == 0.0  # no threshold gains: never empty
    only_places = [example for example in places_and_none() if example.location]
    assert choose_location_bound(only_places, (0.5,)) == (0.0, {})  # nothing to learn from: no bound


def test_the_location_bound_is_kept_only_if_the_model_scores_better_with_it(monkeypatch):
    target = next(t for t in triage.optimize.TARGETS if t.name == "extract_details")
    labelled, options = places_and_none(), OptimizeOptions(k_candidates=(1,))
    threshold, figures = choose_location_bound(labelled, options.location_below_candidates)
    assert threshold > 0
    evalset = [dspy.Example(transcript="wrong number", location="", subject_description="")] * 4

    def run_module(stage, settings, setup, source, examples, title=""):  # bounded, the model leaves it empty
        bounded = source.state["nearest_demos"].get("location_below", 0) > 0
        answer = {"location": "" if bounded else "wrong number", "subject_description": ""}
        return ModuleRun(program=source.label, predictions=[answer] * len(examples))

    monkeypatch.setattr(triage.nearest_search, "run_module", run_module)
    chosen, scores, notes = choose_nearest(target, options, labelled, evalset, None, None, labelled)
    assert chosen == NearestChoice(1, location_below=threshold) and scores[NearestChoice(1)] < scores[chosen]
    assert chosen.describe() == f"k=1, no location below p={threshold:g}"
    assert notes == [f"extract_details: {_location_note(threshold, figures, len(labelled))}"]
    assert "(a place lost counts 3 calls): empty below p=" in notes[0]

    def same_answers(stage, settings, setup, source, examples, title=""):
        return ModuleRun(program=source.label, predictions=[{"location": "", "subject_description": ""}] * 4)

    monkeypatch.setattr(triage.nearest_search, "run_module", same_answers)
    chosen, _, _ = choose_nearest(target, options, labelled, evalset, None, None, labelled)
    assert chosen == NearestChoice(1)  # a tie: no bound
