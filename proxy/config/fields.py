"""The field types every policy section shares, and the strict base model (unknown keys are
errors, models are frozen)."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Upper bounds far above any real quota or duration, below where arithmetic breaks: a
#: Redis Lua number is a double (exact integers up to 2**53), and the fleet's snapshots are
#: JSON (orjson refuses integers over 64 bits). Infinity and NaN are refused too: a rate of
#: ``.inf`` passed validation and failed every call at admission.
MAX_NUMBER: Final = 2**53
PositiveFloat = Annotated[float, Field(gt=0, le=MAX_NUMBER, allow_inf_nan=False)]
#: Counts are whole numbers as written: ``true``, ``"10"`` and ``5.0`` are refused (pydantic's
#: lax mode read ``concurrency: true`` as 1).
PositiveInt = Annotated[int, Field(gt=0, le=MAX_NUMBER, strict=True)]
NonNegativeFloat = Annotated[float, Field(ge=0, le=MAX_NUMBER, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_NUMBER, strict=True)]
Share = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
#: Bedrock's service tiers (X-Amzn-Bedrock-Service-Tier / Converse ``serviceTier.type``).
TierName = Literal["priority", "default", "flex", "reserved"]


class Strict(BaseModel):
    """A policy section: unknown keys are errors (a typo names its field), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
