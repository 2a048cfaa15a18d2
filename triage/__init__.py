"""911-call triage: pure DSPy programs, run at scale by Ray Data stages."""

from triage.programs import CallTriager, DetailExtractor, ExtractDetails, TriageCall
from triage.stages import ExtractDetailsStage, TriageStage

__all__ = ["CallTriager", "DetailExtractor", "ExtractDetails", "ExtractDetailsStage", "TriageCall", "TriageStage"]
