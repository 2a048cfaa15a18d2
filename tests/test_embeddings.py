"""Sentence embeddings (the packaged all-MiniLM-L6-v2, offline): the category classifier reads them
beside TF-IDF, and a second reader on them alone doubts the priority in the review queue."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.doubles import fields_for, transcript_of
from tests.test_nearest import POOL, saved_and_loaded
from tests.test_review import FIRE, QUESTION, TRAIN, batch, stage_with
from triage.demos import nearest_pool, triage_demo
from triage.embeddings import DIMENSIONS, embed
from triage.evaluation import load_labeled
from triage.nearest_demos import NearestDemos
from triage.programs import PRIORITIES, CallTriager
from triage.retrieval import SecondOpinion, SimilarCalls
from triage.stages import TriageStage


@pytest.fixture(scope="module")
def train_pool() -> list[dict]:
    return nearest_pool(load_labeled(TRAIN), triage_demo)


def test_calls_that_mean_the_same_are_closer_than_calls_that_share_words():
    house_fire, flames, lost_key = embed(
        ["My house is on fire", "Flames are coming out of my home", "I lost the key to my house"]
    )
    assert np.linalg.norm(house_fire) == pytest.approx(1.0, abs=1e-5)
    assert house_fire @ flames > house_fire @ lost_key + 0.2
    assert embed([]).shape == (0, DIMENSIONS)


def test_a_classifier_reading_embeddings_needs_them_and_one_on_tfidf_does_not():
    texts, labels = [d["transcript"] for d in POOL], [d["category"] for d in POOL]
    index, embeddings = SimilarCalls(texts), embed(texts)
    both = SecondOpinion.on_index(index, labels, embeddings)
    assert (both.reads_words, both.reads_meaning) == (True, True)
    with pytest.raises(ValueError, match="sentence embeddings"):
        both.probabilities_of(index.vector(FIRE))
    probabilities = both.probabilities_of(index.vector(FIRE), embed([FIRE])[0])
    assert set(probabilities) == {"fire", "animal"} and max(probabilities, key=probabilities.get) == "fire"
    reader = SecondOpinion.on_embeddings(embeddings, labels)
    assert (reader.reads_words, reader.reads_meaning) == (False, True)
    assert max(reader.probabilities_of(embedding=embed([FIRE])[0]).items(), key=lambda kv: kv[1])[0] == "fire"
    assert SecondOpinion.on_embeddings(embeddings, ["fire"] * len(POOL)) is None  # one label: nothing to learn


def test_embeddings_beside_tfidf_get_more_dev_categories_right(train_pool):
    dev = load_labeled("data/dev.jsonl")
    words = NearestDemos(train_pool, k=1)
    meaning = NearestDemos(train_pool, k=1, embedded=("category",))
    assert meaning.classifier("category").reads_meaning and not meaning.classifier("priority").reads_meaning

    def right(nearest: NearestDemos) -> int:
        answers = [nearest.probabilities(example.transcript, "category") for example in dev]
        return sum(max(a, key=a.get) == example.category for a, example in zip(answers, dev, strict=True))

    assert right(meaning) > right(words) + 3  # 57 against 52 of 73 (optimize's choice reads the same)


def test_the_second_reader_belongs_to_a_program_that_reads_embeddings(train_pool, tmp_path):
    assert NearestDemos(train_pool, k=1).reader_probabilities(FIRE, "priority") == {}
    reading = NearestDemos(train_pool, k=1, embedded=("category",))
    fire = reading.reader_probabilities(FIRE, "priority")
    assert set(fire) == set(PRIORITIES) and sum(fire.values()) == pytest.approx(1.0)
    assert max(fire, key=fire.get) == "urgent"
    loaded = saved_and_loaded({"k": 1, "embedded": ["category"], "pool": POOL}, tmp_path)
    assert loaded.nearest.embedded == ("category",)
    plain = CallTriager()
    plain.nearest.load_state({"k": 1, "pool": POOL})
    assert "embedded" not in plain.dump_state()["nearest_demos"]  # older program files stay as they were


def test_triage_stage_flags_an_answer_the_second_reader_doubts_and_keeps_it(train_pool):
    program = CallTriager()
    program.nearest.load_state({"k": 1, "embedded": ["category"], "pool": train_pool})

    def script(request):  # the LM calls the fire non-urgent and the road question urgent
        calm = "on fire" in transcript_of(request)
        return fields_for("triage", priority="non_urgent" if calm else "urgent", category="other")

    stage, _ = stage_with(TriageStage, script, program.dump_state())
    rows = asyncio.run(stage(batch([FIRE, QUESTION]))).to_pylist()
    assert [r["priority"] for r in rows] == ["non_urgent", "urgent"]  # never changed
    fire_reasons, question_reasons = rows[0]["review"].split("; "), rows[1]["review"].split("; ")
    said = "a second reader (sentence embeddings) says"
    assert any(r.startswith(f"possible under-triage: {said} urgent (") for r in fire_reasons)
    assert any(r.startswith(f"priority disagrees: {said} not_an_emergency (") for r in question_reasons)
    assert stage.evidence(FIRE)["second_reader"] == program.nearest.reader_probabilities(FIRE, "priority")
