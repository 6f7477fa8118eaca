"""Building blocks of every typed config: a strict base model (unknown keys
are errors) and the shape types. Kept apart from `pipeline.config` so that
method modules can define their settings without importing the run config."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Triple = tuple[int, int, int]
PositiveTriple = tuple[
    Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
