"""The job spec: schema (defaults and derived values), loading (file:line errors), secrets.

Imports nothing of rayft's but errors, so workers and tools read a spec without Ray or torch.
"""

from rayft.spec.load import load_spec, validate_spec
from rayft.spec.paths import anchored
from rayft.spec.schema import (
    DataSpec,
    EvalSpec,
    FilterSpec,
    JobSpec,
    MethodSpec,
    ModelSpec,
    RunSpec,
    ScalingSpec,
    SourceSpec,
    StepPlan,
    TrainOnSpec,
    TrainSpec,
    TuneSpec,
)

__all__ = [
    "DataSpec",
    "EvalSpec",
    "FilterSpec",
    "JobSpec",
    "MethodSpec",
    "ModelSpec",
    "RunSpec",
    "ScalingSpec",
    "SourceSpec",
    "StepPlan",
    "TrainOnSpec",
    "TrainSpec",
    "TuneSpec",
    "anchored",
    "load_spec",
    "validate_spec",
]
