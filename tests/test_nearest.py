"""Nearest-call demos: chosen per call, saved with the program, the most similar (or the neighbourhood's voice) last."""

from __future__ import annotations

import dspy
import pytest

from triage.programs import CallTriager, NearestDemos, clip

POOL = [
    {"call_id": "fire-1", "transcript": "kitchen fire flames smoke house", "priority": "urgent", "category": "fire"},
    {
        "call_id": "fire-2",
        "transcript": "smoke alarm kitchen burnt toast",
        "priority": "non_urgent",
        "category": "fire",
    },
    {"call_id": "dog-1", "transcript": "loose dog barking street", "priority": "non_urgent", "category": "animal"},
    {"call_id": "fire-3", "transcript": "house fire smoke flames garage", "priority": "urgent", "category": "fire"},
    {"call_id": "fire-4", "transcript": "fire smoke flames neighbours house", "priority": "urgent", "category": "fire"},
]
for demo in POOL:
    demo |= {"reasoning": "Category: x.", "summary": demo["call_id"]}


def ids(nearest: NearestDemos, transcript: str) -> list[str]:
    return [demo["call_id"] for demo, _ in nearest.nearest(transcript)]


def test_the_k_most_similar_calls_come_most_similar_last():
    assert ids(NearestDemos(POOL, k=2), "loose dog on my street")[-1] == "dog-1"
    assert ids(NearestDemos(POOL, k=3), "house fire flames garage") == ["fire-4", "fire-1", "fire-3"]
    [(demo, similarity)] = NearestDemos(POOL, k=1).nearest("smoke alarm kitchen burnt toast")
    assert demo["call_id"] == "fire-2" and similarity == pytest.approx(1.0)
    assert NearestDemos([], k=2).nearest("anything") == []


def test_with_a_vote_the_last_demo_carries_the_neighbourhoods_labels():
    transcript = "smoke alarm kitchen toast, flames in the house, fire"
    plain = NearestDemos(POOL, k=2).nearest(transcript)
    assert plain[-1][0]["call_id"] == "fire-2"  # the single nearest call says non_urgent
    voted = NearestDemos(POOL, k=2, vote=4).nearest(transcript)
    assert voted[-1][0]["call_id"] == "fire-3"  # three of its four neighbours say urgent: the nearest of them
    assert voted[0][0]["call_id"] == "fire-2"  # the nearest call is still shown, before it
    assert len(voted) == 2


def test_the_pool_and_settings_survive_save_and_load(tmp_path):
    program = CallTriager()
    program.nearest.load_state({"k": 2, "max_demo_chars": 12, "vote": 3, "pool": POOL})
    program.save(str(tmp_path / "triager.json"))
    loaded = CallTriager()
    loaded.load(str(tmp_path / "triager.json"))
    assert (loaded.nearest.k, loaded.nearest.max_demo_chars, loaded.nearest.vote) == (2, 12, 3)
    assert loaded.nearest.pool == POOL
    demos = loaded.nearest.demos("kitchen fire")
    assert all(isinstance(d, dspy.Example) and len(d.transcript) <= 12 for d in demos)
    assert loaded.triage.predict.demos == []


def test_clip_cuts_at_a_word_boundary():
    assert clip("a short call", 100) == "a short call"
    assert clip("one two three four five", 14) == "one two ..."
    assert clip("anything", None) == "anything"
