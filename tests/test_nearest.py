"""Nearest-call demos: chosen per call, saved with the program, the most similar (or the neighbourhood's voice) last."""

from __future__ import annotations

import types
import typing

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from triage.lm import ChatAdapter, GrammarJSONAdapter
from triage.nearest_demos import NearestDemos, clip
from triage.programs import CATEGORIES, CallTriager, DetailExtractor, TriageCall, with_choices

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


def saved_and_loaded(nearest_state: dict, tmp_path) -> CallTriager:
    """A triager with this nearest-demo state, saved to a file and loaded into a fresh one."""
    program = CallTriager()
    program.nearest.load_state(nearest_state)
    program.save(str(tmp_path / "triager.json"))
    loaded = CallTriager()
    loaded.load(str(tmp_path / "triager.json"))
    return loaded


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
    loaded = saved_and_loaded({"k": 2, "max_demo_chars": 12, "vote": 3, "choices": 4, "pool": POOL}, tmp_path)
    assert (loaded.nearest.k, loaded.nearest.max_demo_chars, loaded.nearest.vote) == (2, 12, 3)
    assert loaded.nearest.choices == 4
    assert loaded.nearest.pool == POOL
    demos = loaded.nearest.demos("kitchen fire")
    assert all(isinstance(d, dspy.Example) and len(d.transcript) <= 12 for d in demos)
    assert loaded.triage.predict.demos == []


def test_clip_cuts_at_a_word_boundary():
    assert clip("a short call", 100) == "a short call"
    assert clip("one two three four five", 14) == "one two ..."
    assert clip("anything", None) == "anything"


SMOKE_AND_FLAMES = "smoke alarm kitchen toast, flames in the house, fire"


def test_choices_are_the_labels_the_nearest_calls_carry_likeliest_first():
    choices = NearestDemos(POOL, k=2, choices=4).neighbourhood(SMOKE_AND_FLAMES).choices
    assert choices == {"priority": ("urgent", "non_urgent"), "category": ("fire",)}  # three urgent outweigh one
    assert NearestDemos(POOL, k=2, choices=1).neighbourhood(SMOKE_AND_FLAMES).choices == {
        "priority": ("non_urgent",),
        "category": ("fire",),
    }
    assert NearestDemos(POOL, k=2).neighbourhood(SMOKE_AND_FLAMES).choices == {}  # off by default


def test_with_choices_the_model_is_held_to_the_neighbours_labels_and_keeps_another_valid_one():
    program = CallTriager()
    program.nearest.load_state({"k": 1, "choices": 4, "pool": POOL})
    answer = {"reasoning": "r", "priority": "urgent", "category": "fire", "summary": "s"}
    lm = dspy.utils.DummyLM([answer], adapter=dspy.JSONAdapter())
    with dspy.context(lm=lm, adapter=GrammarJSONAdapter()):
        assert program(transcript=SMOKE_AND_FLAMES).priority == "urgent"
    # The embedded model's prompt lists every label (the same system message for every call, so
    # its KV cache keeps it); the bound reaches it through the grammar's schema.
    system = lm.history[-1]["messages"][0]["content"]
    assert "- priority: one of urgent, non_urgent, not_an_emergency;" in system
    narrowed = with_choices(TriageCall, (("category", ("fire",)), ("priority", ("urgent", "non_urgent"))))
    adapter = GrammarJSONAdapter()
    assert adapter.format_system_message(narrowed) == adapter.format_system_message(TriageCall)
    kwargs: dict = {}
    schema_lm = types.SimpleNamespace(supported_params={"response_format"}, supports_response_schema=True)
    adapter._prepare_response_format(schema_lm, kwargs, narrowed)
    properties = kwargs["response_format"].model_json_schema()["properties"]
    assert properties["priority"]["enum"] == ["urgent", "non_urgent"]
    assert properties["category"]["const"] == "fire"
    # A hosted model has no grammar: its prompt names the bound.
    assert "exactly match (no extra characters) one of: urgent; non_urgent\n" in ChatAdapter().format_system_message(
        narrowed
    )
    # A valid label outside the bound is kept as answered (the review queue says so); an invalid one is not.
    outside = dspy.utils.DummyLM([{**answer, "priority": "not_an_emergency"}], adapter=dspy.JSONAdapter())
    with dspy.context(lm=outside, adapter=GrammarJSONAdapter()):
        assert program(transcript=SMOKE_AND_FLAMES).priority == "not_an_emergency"
    invalid = dspy.utils.DummyLM([{**answer, "priority": "fairly urgent"}], adapter=dspy.JSONAdapter())
    with dspy.context(lm=invalid, adapter=GrammarJSONAdapter()), pytest.raises(AdapterParseError):
        program(transcript=SMOKE_AND_FLAMES)


def test_with_choices_keeps_only_values_the_field_allows():
    narrowed = with_choices(TriageCall, (("priority", ("non_urgent", "invented")), ("category", ("invented",))))
    assert typing.get_args(narrowed.output_fields["priority"].annotation) == ("non_urgent",)
    assert typing.get_args(narrowed.output_fields["category"].annotation) == CATEGORIES  # none left: its own
    assert with_choices(TriageCall, (("summary", ("",)),)).output_fields["summary"].annotation == typing.Literal[""]
    assert with_choices(TriageCall, (("absent", ("x",)),)) is TriageCall
    assert with_choices(TriageCall, (("priority", ("urgent",)),)) is with_choices(
        TriageCall, (("priority", ("urgent",)),)
    )


def test_a_label_with_too_small_a_share_of_the_neighbours_is_no_choice():
    shares = NearestDemos(POOL, k=2, choices=4, choice_share=0.45).neighbourhood(SMOKE_AND_FLAMES).choices
    assert shares["priority"] == ("urgent",)  # the one non-urgent call holds 40% of the similarity
    kept = NearestDemos(POOL, k=2, choices=4, choice_share=0.1).neighbourhood(SMOKE_AND_FLAMES).choices
    assert kept["priority"] == ("urgent", "non_urgent")
    everything = NearestDemos(POOL, k=2, choices=4, choice_share=1.0).neighbourhood(SMOKE_AND_FLAMES).choices
    assert everything["priority"] == ("urgent",)  # the likeliest always stays


TOAST = "kitchen smoke alarm toast"  # 4 neighbours: 69% of the similarity non_urgent, 31% urgent


def test_urgent_stays_a_choice_on_a_smaller_share_than_the_other_labels():
    shares = NearestDemos(POOL, k=1).shares(TOAST, "priority", 4)
    assert 0.25 < shares["urgent"] < 0.35 < 0.65 < shares["non_urgent"]
    same = NearestDemos(POOL, k=1, choices=4, choice_share=0.35)
    assert same.neighbourhood(TOAST).choices["priority"] == ("non_urgent",)
    own = NearestDemos(POOL, k=1, choices=4, choice_share=0.35, urgent_share=0.25)
    assert own.neighbourhood(TOAST).choices["priority"] == ("non_urgent", "urgent")  # the likeliest first
    assert own.neighbourhood(SMOKE_AND_FLAMES).choices["priority"] == ("urgent", "non_urgent")  # 40% non_urgent
    assert own.neighbourhood(TOAST).choices["category"] == ("fire",)  # urgent_share is priority's only
    strict = NearestDemos(POOL, k=1, choices=4, choice_share=1.0, urgent_share=0.0)
    assert strict.neighbourhood(TOAST).choices["priority"] == ("non_urgent", "urgent")  # the likeliest always stays


def test_urgents_share_survives_save_and_load_and_older_files_keep_one_share(tmp_path):
    state = {"k": 1, "choices": 4, "choice_share": 0.35, "urgent_share": 0.25, "pool": POOL}
    loaded = saved_and_loaded(state, tmp_path)
    assert loaded.nearest.urgent_share == 0.25
    assert loaded.nearest.neighbourhood(TOAST).choices["priority"] == ("non_urgent", "urgent")
    older = CallTriager()
    older.nearest.load_state({"k": 1, "choices": 4, "choice_share": 0.35, "pool": POOL})
    assert older.nearest.urgent_share is None and "urgent_share" not in older.dump_state()["nearest_demos"]
    assert older.nearest.neighbourhood(TOAST).choices["priority"] == ("non_urgent",)


def test_the_callers_danger_words_leave_urgent_the_only_priority_choice(tmp_path):
    bounded = {"k": 1, "choices": 4, "choice_share": 0.35, "pool": POOL}
    gun = f"Caller: {TOAST}, and my neighbour is waving a gun"  # "gun": a word no pool call has
    assert NearestDemos(**bounded).neighbourhood(gun).choices["priority"] == ("non_urgent",)
    on_danger = NearestDemos(**bounded, urgent_on_danger=True)
    assert on_danger.neighbourhood(gun).choices["priority"] == ("urgent",)
    assert on_danger.neighbourhood(gun).choices["category"] == ("fire",)  # the priority's only
    assert on_danger.neighbourhood(TOAST).choices["priority"] == ("non_urgent",)  # no danger words
    assert on_danger.neighbourhood(f"Caller: {TOAST}, no gun or anything").choices["priority"] == ("non_urgent",)
    asked = f"Dispatcher: Did you see a gun? Caller: {TOAST}"  # the dispatcher's words describe nothing
    assert on_danger.neighbourhood(asked).choices["priority"] == ("non_urgent",)
    left_by_the_bound = NearestDemos(**bounded, urgent_share=0.25, urgent_on_danger=True)
    assert left_by_the_bound.neighbourhood(TOAST).choices["priority"] == ("non_urgent", "urgent")
    assert left_by_the_bound.neighbourhood(gun).choices["priority"] == ("urgent",)
    loaded = saved_and_loaded({**bounded, "urgent_on_danger": True}, tmp_path)
    assert loaded.nearest.neighbourhood(gun).choices["priority"] == ("urgent",)
    assert "urgent_on_danger" not in saved_and_loaded(bounded, tmp_path).dump_state()["nearest_demos"]


def test_a_label_named_in_classified_is_bounded_by_the_pools_classifier_not_the_neighbours():
    nearest = NearestDemos(POOL, k=1, choices=4, choice_share=0.45, classified=("priority",), classifier_share=0.0)
    probabilities = nearest.classifier("priority").probabilities(SMOKE_AND_FLAMES)
    choices = nearest.neighbourhood(SMOKE_AND_FLAMES).choices
    assert choices["priority"] == tuple(sorted(probabilities, key=lambda p: -probabilities[p]))  # every label: share 0
    assert choices["category"] == ("fire",)  # still the neighbours'
    nearest.classifier_share = 1.0
    likeliest = max(probabilities, key=probabilities.__getitem__)
    assert nearest.neighbourhood(SMOKE_AND_FLAMES).choices["priority"] == (likeliest,)  # the likeliest stays
    assert nearest.classifier("animal") is None  # a label the pool does not carry: no classifier
    toast = nearest.classifier("priority").probabilities(TOAST)
    assert max(toast, key=toast.__getitem__) == "non_urgent"
    nearest.urgent_share = 0.0  # urgent's own share holds for the classifier's bound too
    assert nearest.neighbourhood(TOAST).choices["priority"] == ("non_urgent", "urgent")


def test_the_classifier_bound_survives_save_and_load(tmp_path):
    loaded = saved_and_loaded(
        {"k": 1, "choices": 3, "choice_share": 0.4, "classified": ["category"], "classifier_share": 0.3, "pool": POOL},
        tmp_path,
    )
    assert (loaded.nearest.classified, loaded.nearest.classifier_share) == (("category",), 0.3)
    unbounded = CallTriager()
    unbounded.nearest.load_state({"k": 1, "pool": POOL})
    assert "classified" not in unbounded.dump_state()["nearest_demos"]  # older program files stay as they were


def test_shares_are_each_labels_part_of_the_nearest_calls_similarity():
    shares = NearestDemos(POOL, k=1).shares(SMOKE_AND_FLAMES, "priority", 4)
    assert set(shares) == {"urgent", "non_urgent"} and sum(shares.values()) == pytest.approx(1.0)
    assert shares["non_urgent"] == pytest.approx(0.4, abs=0.05)  # as the share bound above sees it
    assert NearestDemos([], k=1).shares(SMOKE_AND_FLAMES, "priority", 4) == {}


PLACES = [
    {"transcript": "fire at 12 Elm Street, the corner house", "location": "12 Elm Street"},
    {"transcript": "a crash on Main Street near the bridge", "location": "Main Street near the bridge"},
    {"transcript": "the dog is loose at 40 Oak Avenue again", "location": "40 Oak Avenue"},
    {"transcript": "hello? sorry, wrong number, my mistake", "location": ""},
    {"transcript": "sorry, I dialled by mistake, no problem here", "location": ""},
    {"transcript": "how do I get a copy of a police report", "location": ""},
]
for demo in PLACES:
    demo |= {"reasoning": "Quoted from the call.", "subject_description": ""}


def test_a_call_whose_caller_names_no_place_may_only_have_an_empty_location(tmp_path):
    bounded = NearestDemos(PLACES, k=1, location_below=0.5)
    no_place, place = "sorry, wrong number, my mistake", "smoke coming from 7 Elm Street"
    assert bounded.states_location(no_place) < 0.5 < bounded.states_location(place)
    assert bounded.neighbourhood(no_place).choices == {"location": ("",)}
    assert bounded.neighbourhood(place).choices == {}
    assert NearestDemos(PLACES, k=1).neighbourhood(no_place).choices == {}  # off by default
    assert NearestDemos(POOL, k=1, location_below=0.5).neighbourhood(no_place).choices == {}  # no locations: no bound
    program = DetailExtractor()
    program.nearest.load_state({"k": 1, "location_below": 0.5, "pool": PLACES})
    program.save(str(tmp_path / "details.json"))
    loaded = DetailExtractor()
    loaded.load(str(tmp_path / "details.json"))
    assert loaded.nearest.location_below == 0.5
    assert loaded.nearest.neighbourhood(no_place).choices == {"location": ("",)}
    older = DetailExtractor()
    older.nearest.load_state({"k": 1, "pool": PLACES})  # a file from before the bound
    assert older.nearest.location_below == 0.0 and "location_below" not in older.dump_state()["nearest_demos"]
    # A hosted model that names a place anyway keeps its answer; the review queue says so.
    lm = dspy.utils.DummyLM([{"reasoning": "r", "location": "the corner", "subject_description": ""}])
    with dspy.context(lm=lm, adapter=ChatAdapter()):
        assert loaded(transcript=no_place).location == "the corner"
