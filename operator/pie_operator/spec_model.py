"""The base of every spec model: camelCase aliases as in the CRD, and unknown fields are an error (the CRD and the
models must agree). Its own module so that each part of the spec can live in a module of its own (spec.py,
spec_autoscaling.py) without importing another."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """camelCase aliases as in the CRD; unknown fields are an error (the CRD and these models must agree)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
