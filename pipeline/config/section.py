"""The base every config section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # extra="forbid" turns an unknown key into an error that names it; frozen keeps workers honest.
    # use_attribute_docstrings: the string under a field is its description, the one place a field's
    # meaning is written; the README's config reference and the CLI's help are generated from it
    # (pipeline.config.reference).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
