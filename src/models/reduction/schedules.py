"""Schedules: how many tokens each block removes, as their own config group (stub; being written)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional


def resolve_params(model, method: str, params: Mapping[str, Any], schedule: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Method parameters with the schedule's per-block counts / keep rates filled in."""
    return dict(params)
