"""The two designs the benchmark compares the pipeline with, run against the same provider.

- `original`: the seed design: two Ray Data stages of four actors each, one synchronous
  DSPy call at a time per actor.
- `dspy-async`: what a user would write without Ray: one process, `acall` under one
  semaphore of the same size as the pipeline's in-flight budget.

Both read JSONL with a `transcript` column and write Parquet; neither retries beyond DSPy's
own `num_retries`. Usage: python scripts/baselines.py DESIGN INPUT OUTPUT API_BASE CONCURRENCY MODEL
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from triage.lm import ChatAdapter  # noqa: E402
from triage.programs import CallTriager, DetailExtractor  # noqa: E402

FIELDS = ("priority", "category", "summary", "location", "subject_description")


def make_lm(model: str, api_base: str) -> dspy.LM:
    return dspy.LM(model, api_base=api_base, api_key="bench", cache=False, num_retries=8)


def dspy_async(input_path: str, output: str, api_base: str, concurrency: int, model: str) -> None:
    lm = make_lm(model, api_base)
    triager, extractor = CallTriager(), DetailExtractor()
    gate = asyncio.Semaphore(concurrency)

    async def call(module: dspy.Module, transcript: str) -> dspy.Prediction | None:
        async with gate:
            try:
                return await module.acall(transcript=transcript)
            except Exception:
                return None

    async def one(record: dict) -> dict:
        transcript = record["transcript"]
        with dspy.context(lm=lm, adapter=ChatAdapter()):
            triage = await call(triager, transcript)
            details = await call(extractor, transcript)
        row = {"call_id": record["call_id"], "transcript": transcript}
        for name in FIELDS:
            source = triage if name in ("priority", "category", "summary") else details
            row[name] = getattr(source, name, None) if source is not None else None
        return row

    async def main() -> list[dict]:
        records = [json.loads(line) for line in Path(input_path).read_text().splitlines()]
        return await asyncio.gather(*(one(r) for r in records))

    rows = asyncio.run(main())
    Path(output).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), Path(output) / "part-0.parquet")


class _SyncStage:
    def __init__(self, module_class: type, model: str, api_base: str) -> None:
        self.lm = make_lm(model, api_base)
        self.program = module_class()

    def __call__(self, batch: dict) -> dict:
        out = {name: [] for name in self.fields}
        for transcript in batch["transcript"]:
            with dspy.context(lm=self.lm, adapter=ChatAdapter()):
                try:
                    prediction = self.program(transcript=transcript)
                except Exception:
                    prediction = None
            for name in self.fields:
                out[name].append(getattr(prediction, name, None) if prediction is not None else None)
        return {**batch, **out}


class _SyncTriage(_SyncStage):
    fields = ("priority", "category", "summary")

    def __init__(self, model: str, api_base: str) -> None:
        super().__init__(CallTriager, model, api_base)


class _SyncDetails(_SyncStage):
    fields = ("location", "subject_description")

    def __init__(self, model: str, api_base: str) -> None:
        super().__init__(DetailExtractor, model, api_base)


def original(input_path: str, output: str, api_base: str, concurrency: int, model: str) -> None:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    ray.init(
        include_dashboard=False, runtime_env={"env_vars": {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}}, log_to_driver=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The seed design as written reserves a whole CPU per actor and deadlocks on 2 cores; here its
    # 8 actors, the read and the write share them as fractions (8 x 0.2 + 0.1 + 0.1 <= 2).
    ds = ray.data.read_json(input_path, num_cpus=0.1)
    for stage in (_SyncTriage, _SyncDetails):
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs={"model": model, "api_base": api_base},
            batch_size=8,
            compute=ActorPoolStrategy(size=4),
            num_cpus=0.2,
        )
    ds.write_parquet(output, ray_remote_args={"num_cpus": 0.1})


if __name__ == "__main__":
    design, input_path, output, api_base, concurrency, model = sys.argv[1:7]
    {"dspy-async": dspy_async, "original": original}[design](input_path, output, api_base, int(concurrency), model)
