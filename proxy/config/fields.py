"""The field types every policy section shares, and the strict base model (unknown keys are
errors, models are frozen)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Share = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
#: Bedrock's service tiers (X-Amzn-Bedrock-Service-Tier / Converse ``serviceTier.type``).
TierName = Literal["priority", "default", "flex", "reserved"]


class Strict(BaseModel):
    """A policy section: unknown keys are errors (a typo names its field), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
