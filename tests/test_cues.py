"""The caller's-words check (`triage.cues`): which phrases count, whose turns are read, and how well
the phrases agree with the labelled calls' gold priorities."""

from __future__ import annotations

from triage.cues import caller_words, calm_phrases, cancelling_phrases, danger_phrases
from triage.evaluation import load_labeled


def test_only_the_callers_turns_are_read():
    transcript = (
        "Dispatcher: 911, is anyone hurt? Is there a gun? Caller: No, nobody's hurt, he left an hour ago. "
        "Dispatcher: If anyone stops breathing, call back."
    )
    assert caller_words(transcript) == "  no, nobody's hurt, he left an hour ago. "
    assert danger_phrases(transcript) == []  # the dispatcher's "gun" and "stops breathing" are not the caller's
    assert calm_phrases(transcript) == ["nobody's hurt", "an hour ago"]


def test_every_voice_but_the_dispatchers_is_read():
    open_line = (
        "Dispatcher: 911, what's your emergency? [muffled] Woman: ...stop, you're hurting me... "
        "Man: Give me the phone! Dispatcher: Ma'am? Caller 2: It's at 10:30 Elm."
    )
    assert danger_phrases(open_line) == ["hurting me"]
    assert "ma'am" not in caller_words(open_line) and "10:30 elm" in caller_words(open_line)


def test_a_cancellation_of_an_earlier_call_is_found():
    assert cancelling_phrases(
        "Caller: I called earlier about the loose dog. The owner got him, you can cancel that."
    ) == ["you can cancel"]
    assert cancelling_phrases("Caller: The music stopped, so you don't need to send anybody.") == ["don't need to send"]
    assert cancelling_phrases("Caller: I already cancelled my cards, do I need a report?") == []


def test_a_transcript_without_speaker_labels_is_read_whole_and_apostrophes_are_made_plain():
    assert calm_phrases("The man is long gone, nobody\u2019s in danger.") == ["long gone", "nobody's in danger"]
    assert danger_phrases("MY HUSBAND IS NOT BREATHING") == ["not breathing"]


def test_a_negated_danger_phrase_does_not_count():
    assert danger_phrases("Caller: He had a knife!") == ["knife"]
    assert danger_phrases("Caller: No, I didn't see a knife or anything.") == []
    assert danger_phrases("Caller: There's no fire, just a smell. Is there smoke? My cat is trapped.") == ["trapped"]


def test_calm_phrases_cover_harm_denied_past_events_and_reports():
    said = "Caller: It's not an emergency, it happened last night, I just need a case number for my insurance."
    assert calm_phrases(said) == ["not an emergency", "last night", "case number", "for my insurance"]
    assert calm_phrases("Caller: Please hurry, he's hurting her!") == []
    # "Gone" alone is what a missing person's family says too: only "long gone" / "already gone" count.
    assert calm_phrases("Caller: My mom has Alzheimer's and she's gone, she's not here!") == []
    assert calm_phrases("Caller: The shoplifter? She's already gone.") == ["already gone"]


def test_the_phrases_agree_with_the_gold_priorities_of_the_labelled_calls():
    """What `triage.cues` claims: on train and dev, a calm phrase without a danger phrase marks a
    call that is not urgent and a danger phrase an urgent one (at least 95% of them), in at least
    a tenth of the calls each."""
    calls = load_labeled("data/train.jsonl") + load_labeled("data/dev.jsonl")
    calm = [c.priority for c in calls if calm_phrases(c.transcript) and not danger_phrases(c.transcript)]
    danger = [c.priority for c in calls if danger_phrases(c.transcript)]
    assert len(calm) >= len(calls) / 10 and len(danger) >= len(calls) / 10
    assert sum(priority != "urgent" for priority in calm) >= 0.95 * len(calm)
    assert sum(priority == "urgent" for priority in danger) >= 0.95 * len(danger)
    cancelled = [c.priority for c in calls if cancelling_phrases(c.transcript) and not danger_phrases(c.transcript)]
    assert len(cancelled) >= 3 and set(cancelled) == {"not_an_emergency"}
