"""Every method config composes with the quickstart model and runs (the specialising
method_model/<method>_quickstart.yaml configs set what the 4 blocks and 49 patch tokens need)."""

from pathlib import Path

import pytest
import torch

from src.bench import build_reduced, compose_config
from src.models.profile import count_gmacs

METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_on_the_quickstart_model(method):
    model, params = build_reduced(compose_config([f"method={method}"]))
    state = model.eval().forward_tokens(torch.randn(2, 1, 28, 28))
    assert len(state.tokens_per_block) == 4
    if method != "none":  # fewer than the 7 x 7 patches + CLS
        assert state.tokens_per_block[-1] < 50, (method, params, state.tokens_per_block)
    if method == "tome":  # the quickstart's ToMe merges most in the first block: 50 -> 34 -> 22 -> 14 -> 10
        assert state.tokens_per_block == [34, 22, 14, 10], state.tokens_per_block


def test_compare_experiment_matches_compute_across_methods():
    """experiment=compare_digits's flops schedule lands every method within 3% of the budget."""
    for method in ("tome", "evit", "gtp", "bat", "mstm", "mctf", "ppt", "pitome", "tofu"):
        cfg = compose_config(["experiment=compare_digits", f"method={method}"])
        model, _ = build_reduced(cfg)
        assert abs(count_gmacs(model, 28, 1) - 0.0019) <= 0.03 * 0.0019, method
