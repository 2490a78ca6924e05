"""The field types every policy section shares, and the strict base model (unknown keys are
errors, models are frozen)."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: Upper bounds far above any real quota or duration, below where arithmetic breaks: a
#: Redis Lua number is a double (exact integers up to 2**53), and the fleet's snapshots are
#: JSON (orjson refuses integers over 64 bits). Infinity and NaN are refused too: a rate of
#: ``.inf`` passed validation and failed every call at admission.
MAX_NUMBER: Final = 2**53


def _not_true_or_false(value: object) -> object:
    """``concurrency: true`` is a mistake, not 1 (pydantic's lax mode read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("a number, not true or false")
    return value


# Lax otherwise, as policies have always been read: `5.0` and `"10"` are accepted for a
# count (refusing them would stop instances of a fleet whose stored policy used them).
_NUMBER = BeforeValidator(_not_true_or_false)
PositiveFloat = Annotated[float, _NUMBER, Field(gt=0, le=MAX_NUMBER, allow_inf_nan=False)]
PositiveInt = Annotated[int, _NUMBER, Field(gt=0, le=MAX_NUMBER)]
NonNegativeFloat = Annotated[float, _NUMBER, Field(ge=0, le=MAX_NUMBER, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, _NUMBER, Field(ge=0, le=MAX_NUMBER)]
Share = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
#: Bedrock's service tiers (X-Amzn-Bedrock-Service-Tier / Converse ``serviceTier.type``).
TierName = Literal["priority", "default", "flex", "reserved"]


class Strict(BaseModel):
    """A policy section: unknown keys are errors (a typo names its field), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
