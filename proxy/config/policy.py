"""A whole policy file: its sections, and the checks that span them."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from proxy.config.fields import Name, Strict
from proxy.config.pools import ModelPool
from proxy.config.references import reference_problems
from proxy.config.server import Server
from proxy.config.workloads import Identity, PriorityClass, Workload


class Policy(Strict):
    """A whole policy file."""

    version: Literal[1] = 1
    server: Server = Server()
    identity: Identity = Identity()
    models: dict[Name, ModelPool] = {}
    priorities: dict[Name, PriorityClass] = {"default": PriorityClass()}
    workloads: dict[Name, Workload] = {}

    @model_validator(mode="after")
    def _references_resolve(self) -> Policy:
        problems = reference_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _tiers_resolve(self) -> Policy:
        problems = [
            f"models.{name}.class_tiers.{cls}: unknown priority class '{cls}'"
            for name, pool in self.models.items()
            for cls in pool.class_tiers
            if cls not in self.priorities
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self
