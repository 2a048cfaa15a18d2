"""Provider batch mode (`run --batch`): the same programs, output and schema, at the batch price.

One module per job: `engine` (DSPy engines that record a request or replay its answer),
`render` (the render pass, a Ray Data stage), `plan` (requests into jobs under the provider's
limits), `ledger` (which jobs hold which rows, in the output folder), `client` (lm15's batch
operations), `collect` (answers parsed and validated by the online stages), `runner` (the driver).
docs/batch.md tells the whole story.
"""

from triage.batch.client import check_batch_model
from triage.batch.runner import triage_in_batches

__all__ = ["check_batch_model", "triage_in_batches"]
