"""What a Hydra sweeper optimises, from a run's summary.json dict.

- `optimized_metric: student_val_top1`            one number (hparams_search with one direction)
- `optimized_metric: [student_val_top1, student_gmacs]`   a list, one value per direction
  (hydra-optuna-sweeper's multi-objective mode, `direction: [maximize, minimize]`)
- with `budget.gmacs` (absolute) or `budget.teacher_ratio` (fraction of the unreduced teacher's
  GMACs) set, a single accuracy objective is penalised for runs over the budget:
  score = value - budget.penalty * (gmacs / budget - 1) when gmacs > budget, so the sweeper still
  sees *how far* over budget a setting is (a hard -inf would give TPE nothing to learn from).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Union

from src.models.reduction import ReductionConfigError


def _value(summary: Mapping[str, Any], key: str) -> float:
    if key not in summary or summary[key] is None:
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ReductionConfigError(f"optimized_metric {key!r} is not a number in summary.json; use one of {numeric}")
    return float(summary[key])


def gmacs_budget(summary: Mapping[str, Any], budget: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The GMACs budget in GMACs, or None when no budget is set."""
    budget = budget or {}
    if budget.get("gmacs") is not None and budget.get("teacher_ratio") is not None:
        raise ReductionConfigError("set budget.gmacs or budget.teacher_ratio, not both")
    if budget.get("gmacs") is not None:
        limit = float(budget["gmacs"])
    elif budget.get("teacher_ratio") is not None:
        limit = float(budget["teacher_ratio"]) * _value(summary, "teacher_gmacs")
    else:
        return None
    if limit <= 0:
        raise ReductionConfigError(f"the GMACs budget must be > 0, got {limit} (budget={dict(budget)})")
    return limit


def objective(
    summary: Mapping[str, Any],
    optimized_metric: Union[str, List[str], None],
    budget: Optional[Mapping[str, Any]] = None,
) -> Union[None, float, List[float]]:
    """The sweeper's return value for one finished run (None when nothing is optimised)."""
    if not optimized_metric:
        return None
    if not isinstance(optimized_metric, str):
        if gmacs_budget(summary, budget) is not None:
            raise ReductionConfigError(
                "a GMACs budget applies to one accuracy objective; for accuracy and GMACs "
                "together use the multi-objective list without budget"
            )
        return [_value(summary, k) for k in optimized_metric]
    value = _value(summary, optimized_metric)
    limit = gmacs_budget(summary, budget)
    if limit is not None:
        gmacs = _value(summary, "student_gmacs")
        if gmacs > limit:
            value -= float((budget or {}).get("penalty", 100.0)) * (gmacs / limit - 1.0)
    return value


def check_objective(optimized_metric: Any, budget: Optional[Mapping[str, Any]]) -> None:
    """Fail at start-up (before training) on a malformed objective setting."""
    if optimized_metric is not None and not isinstance(optimized_metric, str):
        if not all(isinstance(k, str) for k in optimized_metric) or len(optimized_metric) < 2:
            raise ReductionConfigError(
                f"optimized_metric must be a summary.json key or a list of >= 2 keys, got {optimized_metric!r}"
            )
    for key in ("gmacs", "teacher_ratio", "penalty"):
        v = (budget or {}).get(key)
        if v is not None and float(v) < 0:
            raise ReductionConfigError(f"budget.{key} must be >= 0, got {v}")
