"""Part files (whole or absent), progress line, manifest."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from triage.cost import estimated_cost
from triage.errors import ConfigError
from triage.manifest import write_manifest
from triage.progress import Progress
from triage.schema import OUTPUT_SCHEMA
from triage.sink import PartWriter, completed_ids, prepare_output_folder, read_output


def batch(ids: list[str], errors: list[str | None] | None = None) -> pa.Table:
    n = len(ids)
    return pa.Table.from_pylist(
        [
            {
                "call_id": i,
                "transcript": "t",
                "errors": e,
                "model": "m",
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "triaged_at": datetime(2026, 1, 1, tzinfo=UTC),
            }
            for i, e in zip(ids, errors or [None] * n, strict=True)
        ],
        schema=OUTPUT_SCHEMA,
    )


def test_part_writer_commits_by_rows_and_by_time(tmp_path):
    now = [0.0]
    writer = PartWriter(tmp_path, rows_per_file=4, seconds_per_file=10, clock=lambda: now[0])
    writer.add(batch(["a", "b"]))
    assert not list(tmp_path.glob("part-*"))  # nothing committed yet (the rows are in the journal)
    writer.add(batch(["c", "d"]))
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    writer.add(batch(["e"]))
    now[0] = 11.0
    writer.add(batch([]))  # time has passed: the pending row is committed
    assert len(list(tmp_path.glob("part-*.parquet"))) == 2
    writer.add(batch(["f"]))
    writer.close()
    assert completed_ids(tmp_path) == {"a", "b", "c", "d", "e", "f"}
    assert writer.rows_written == 6 and writer.files_written == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".", "_"))]  # no temporary, no journal


def test_rows_received_but_not_committed_survive_a_kill_in_the_journal(tmp_path):
    killed = PartWriter(tmp_path, rows_per_file=3, seconds_per_file=1000)
    killed.add(batch(["a", "b", "c"]))  # committed as a part
    killed.add(batch(["d"]))
    killed.add(batch(["e"]))  # d and e not committed: the run is killed here (no close)
    assert completed_ids(tmp_path) == {"a", "b", "c"}
    assert [p.name[:9] for p in tmp_path.iterdir() if p.name.startswith("_")] == ["_journal-"]
    prepare_output_folder(tmp_path, overwrite=False)  # the next run
    assert sorted(read_output(tmp_path, ["call_id"]).column("call_id").to_pylist()) == list("abcde")
    assert not list(tmp_path.glob("_journal-*")) and len(list(tmp_path.glob("part-*"))) == 2
    prepare_output_folder(tmp_path, overwrite=False)  # nothing left to recover: nothing changes
    assert len(list(tmp_path.glob("part-*"))) == 2


def test_a_batch_cut_off_by_the_kill_is_dropped_and_committed_rows_are_not_doubled(tmp_path):
    from triage.sink import write_part

    killed = PartWriter(tmp_path, rows_per_file=100)
    killed.add(batch(["a", "b"]))
    killed.add(batch(["c"]))
    killed.add(batch(["d", "e"]))
    journal = next(tmp_path.glob("_journal-*"))
    journal.write_bytes(journal.read_bytes()[:-10])  # the last batch was being written when the run died
    write_part(tmp_path, batch(["a", "b"]))  # killed after committing a and b, before deleting the journal
    prepare_output_folder(tmp_path, overwrite=False)
    ids = read_output(tmp_path, ["call_id"]).column("call_id").to_pylist()
    assert sorted(ids) == ["a", "b", "c"]  # each exactly once; d and e were never whole on disk


def test_overwrite_deletes_an_old_journal_instead_of_recovering_it(tmp_path):
    PartWriter(tmp_path, rows_per_file=100).add(batch(["a"]))
    prepare_output_folder(tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == [] and read_output(tmp_path).num_rows == 0


def test_leftover_temporaries_are_removed_and_ignored(tmp_path):
    PartWriter(tmp_path, rows_per_file=1).add(batch(["a"]))
    (tmp_path / ".part-dead.parquet.tmp").write_bytes(b"half a file")
    assert completed_ids(tmp_path) == {"a"}  # readers skip the hidden temporary
    prepare_output_folder(tmp_path, overwrite=False)
    assert sorted(p.name[:5] for p in tmp_path.iterdir()) == ["part-"]
    prepare_output_folder(tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == [] and read_output(tmp_path).num_rows == 0


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not this dataset's"):
        prepare_output_folder(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_progress_line_counts_rate_and_time_left():
    now = [100.0]
    stream = io.StringIO()
    progress = Progress(1000, stream=stream, clock=lambda: now[0], log_every=5)
    now[0] = 110.0
    progress.update(250, errors=3, tokens=12_345)
    assert stream.getvalue() == "triage: 250/1000 rows (25%), 25.0 rows/s, 3 with errors, 12k tokens, 30s left\n"
    now[0] = 111.0
    progress.update(10)
    assert stream.getvalue().count("\n") == 1  # not again before log_every


def test_manifest_is_written_atomically_and_cost_is_known_or_none(tmp_path):
    path = write_manifest(tmp_path, {"model": "openai/gpt-4.1-mini", "rows": {"in": 3}})
    assert path.name == "_manifest.json" and '"in": 3' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["_manifest.json"]
    assert estimated_cost("local/smollm2-135m", 1000, 1000) == 0.0
    assert estimated_cost("openai/no-such-model-xyz", 1000, 1000) is None
    assert estimated_cost("openai/gpt-4.1-mini", 1_000_000, 0) > 0
    assert estimated_cost("anthropic/claude-sonnet-4-6", 1_000_000, 0) > 0  # the provider, then the model's name


def test_priority_and_category_read_back_as_categoricals_with_every_level(tmp_path):
    import pandas as pd

    from triage.programs import CATEGORIES, PRIORITIES
    from triage.schema import WORKING_SCHEMA

    working = pa.Table.from_pylist(
        [
            {
                "call_id": "a",
                "priority": "urgent",
                "category": "fire",
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "triaged_at": datetime(2026, 1, 1, tzinfo=UTC),
            },
            {
                "call_id": "b",
                "priority": None,
                "category": None,
                "errors": "triage: failed",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "triaged_at": datetime(2026, 1, 1, tzinfo=UTC),
            },
        ],
        schema=WORKING_SCHEMA,
    )
    writer = PartWriter(tmp_path, rows_per_file=1)
    writer.add(working.slice(0, 1))
    writer.add(working.slice(1, 1))
    frame = pd.read_parquet(tmp_path)
    assert list(frame["priority"].cat.categories) == list(PRIORITIES)
    assert list(frame["category"].cat.categories) == list(CATEGORIES)
    assert frame["category"].value_counts()["noise"] == 0  # a level no row has is still there
    assert frame.set_index("call_id").loc["a", "priority"] == "urgent"
    assert pd.isna(frame.set_index("call_id").loc["b", "priority"])
    assert str(frame["triaged_at"].dtype).startswith("datetime64") and frame["prompt_tokens"].dtype == "int64"
