"""Base class for every API and config model: camelCase on the wire, snake_case in Python, no unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    """A strict model with camelCase aliases; unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_enum_values=True,
    )

    def dump(self) -> dict:
        """The wire form: camelCase keys, defaults included, None left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
