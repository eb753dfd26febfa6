"""What one background pass did (reconcile, dispatch, prune): counts, printed as ``name=value``
in field order, as the CLI prints them and the log lines carry them."""

from __future__ import annotations

from dataclasses import fields


class PassReport:
    """Base of a pass's report (a dataclass): its integer fields are its counts."""

    def __str__(self) -> str:
        counts = (
            (field.name, getattr(self, field.name))
            for field in fields(self)  # type: ignore[arg-type]
        )
        return " ".join(f"{name}={value}" for name, value in counts if isinstance(value, int))
