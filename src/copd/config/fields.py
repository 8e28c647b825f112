"""The building blocks of the config schema: its base section, its key errors, and the field
types whose values are the names in a registry (checked when a config loads)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

from copd.core.advantages import GROUP_ADVANTAGES
from copd.core.losses import LOSS_AGGREGATIONS
from copd.core.merge import MERGE_METHODS
from copd.core.opd import OPD_ESTIMATORS
from copd.schedule.plan import PLANS
from copd.schedule.topology import TOPOLOGIES


class KeyProblem(ValueError):
    """A validator's error about one key below the model that raises it (`loc` is relative to it).

    The loader appends `loc` to where pydantic reports the error, so the message names that key
    and its YAML line instead of the whole section.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.loc = tuple(loc)


def unknown_name(what: str, value: object, valid: Iterable[str]) -> str:
    """'unknown WHAT 'x' (did you mean 'y'?); valid: a, b, c' for a name missing from a registry."""
    names = list(valid)
    near = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown {what} {value!r}{hint}; valid: {', '.join(names)}"


def one_of(registry: Mapping[str, Any], what: str) -> Any:
    """A str field whose values are the keys of `registry` (the config reference lists them)."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and value in registry:
            return value
        raise ValueError(unknown_name(what, value, registry))

    return Annotated[Literal[tuple(registry)], BeforeValidator(check)]


# Each is checked against its registry when the config loads, long before training needs it.
AdvantageName = one_of(GROUP_ADVANTAGES, "advantage")
LossAggregationName = one_of(LOSS_AGGREGATIONS, "loss aggregation")
EstimatorName = one_of(OPD_ESTIMATORS, "OPD estimator")
MergeMethodName = one_of(MERGE_METHODS, "merge method")
PlanName = one_of(PLANS, "plan")
TopologyName = one_of(TOPOLOGIES, "topology")
# The experiment trackers of run.report_to; each has its class in copd.reporting.trackers.TRACKERS.
TRACKER_NAMES = ("tensorboard", "wandb", "trackio")
TrackerName = one_of(dict.fromkeys(TRACKER_NAMES), "tracker")


def tracker_list(value: Any) -> Any:
    """`report_to: wandb` is a list of one; `none` (as in TRL) is the empty list."""
    if value is None or value == "none":
        return []
    return [value] if isinstance(value, str) else value


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
