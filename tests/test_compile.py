"""torch.compile of every method (src.models.compile.compile_model): one graph for the whole forward
pass (fullgraph, no recompilation across blocks or across batches of one shape), outputs equal to eager,
training-mode forward + backward with the same loss and gradients.

Cost: dynamo's capture is what these tests check, so most run the "eager" backend (the captured graph
runs op by op); methods with trainable modules of their own (DynamicViT's predictors, MSTM's fusion,
STViT's centre) train through "aot_eager" (AOTAutograd's functionalised forward and backward graphs,
what inductor compiles); the ONNX tests put every method's graph through torch.export's
functionalisation as well. One slow test compiles with the default inductor backend (C++ kernels)."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from src.models import REGISTRY, apply_reduction
from src.models.compile import compile_model, is_compiled, static_schedule
from src.models.reduction.base import ReductionMethod, unreduced_copy
from tests.tiny import images, tiny_vit

#: parameters that make every method reduce on the tiny 4-block model (64 patch tokens)
PARAMS = {
    "tome": dict(r=4),
    "evit": dict(keep_rate=0.5, locations=[1, 2]),
    "gtp": dict(r=4),
    "dynamicvit": dict(keep_rate=0.7, locations=[1, 2]),
    "bat": dict(keep_rate=0.5, locations=[1, 2]),
    "mstm": dict(keep_rate=0.5, locations=[1, 2]),
    "stvit": dict(block=1, pool_size=2),
    "mctf": dict(r=6),
    "ppt": dict(r=8, locations=[1, 2]),
    "diffrate": dict(prune_kept_num=[60, 50, 40], merge_kept_num=[56, 44, 36]),
}
METHODS = sorted(REGISTRY)
#: methods whose token counts follow from the input shape (one graph per shape) / depend on the pixels
STATIC = [m for m in METHODS if getattr(REGISTRY[m], "static_schedule", True)]
DYNAMIC = [m for m in METHODS if m not in STATIC]


def reduced(method, seed=0):
    model = tiny_vit(seed, depth=3)
    torch.manual_seed(seed)
    return apply_reduction(model, method, **PARAMS.get(method, {}))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", STATIC)
def test_eval_is_one_graph_equal_to_eager_without_recompiling(method):
    model = reduced(method).eval()
    x, y = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        expected_x, expected_y = model(x), model(y)
        counter = CompileCounterWithBackend("eager")
        assert static_schedule(model)
        compile_model(model, backend=counter)  # fullgraph: a graph break would raise here
        got_x, got_y = model(x), model(y)
        state = model.forward_tokens(x)  # the trainer's path runs the same graph
    assert counter.frame_count == 1  # all blocks in one graph, the second batch of the shape reuses it
    torch.testing.assert_close(got_x, expected_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_y, expected_y, rtol=1e-5, atol=1e-5)
    assert state.tokens_per_block == reduced(method).eval().forward_tokens(x).tokens_per_block


def _train_step(model, teacher, x, seed):
    """Forward (tokens + head) and backward of the trainer's loss: logits plus the method's own losses."""
    torch.manual_seed(seed)
    state = model.forward_tokens(x)
    logits = model.forward_head_state(state)
    loss = logits.square().mean()
    if getattr(model.reduction, "needs_teacher", False):
        with torch.no_grad():
            t_state = teacher.forward_tokens(x)
            t_logits = teacher.forward_head_state(t_state)
        extra = model.reduction.losses(state, logits=logits, teacher_logits=t_logits, teacher_state=t_state)
        loss = loss + sum(extra.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("method", [m for m in STATIC if m != "none"])
def test_training_forward_backward_matches_eager(method):
    """Train mode (DynamicViT's Gumbel decisions and masked softmax, MSTM's fusion, STViT's centre are
    trained; the others train the backbone through their reductions): same loss and gradients."""
    model = reduced(method).train()
    teacher = apply_reduction(unreduced_copy(model), "none").eval()
    x = images(2, seed=3)
    loss, grads = _train_step(model, teacher, x, seed=7)
    counter = CompileCounterWithBackend("aot_eager" if model.reduction.new_module_names() else "eager")
    compile_model(model, backend=counter)
    got_loss, got_grads = _train_step(model, teacher, x, seed=7)
    again, _ = _train_step(model, teacher, images(2, seed=4), seed=8)  # same shape: no recompilation
    assert counter.frame_count == 1 and torch.isfinite(again)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(grads) and grads
    for name, g in grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{method}: gradient of {name}")


@pytest.mark.parametrize("method", DYNAMIC)
def test_dynamic_schedule_compiles_with_graph_breaks_and_matches_eager(method):
    """Per-image token counts: compile_model picks fullgraph=False; the outputs are eager's."""
    model = reduced(method).eval()
    x = images(3, seed=1)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=False):
        expected = model(x)
        assert not static_schedule(model)
        compile_model(model, backend="eager")
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_default_backend():
    """The default backend (inductor, C++ kernels on CPU; minutes of compilation on a busy 2-core
    machine): GTP (explicit attention map, in-place biased softmax, propagation) as compiled code
    equals eager."""
    torch.manual_seed(0)
    model = apply_reduction(tiny_vit(depth=2), "gtp", r=4).eval()
    x = images(2, seed=5)
    with torch.no_grad():
        expected = model(x)
        counter = CompileCounterWithBackend("inductor")
        compile_model(model, backend=counter)
        got, got2 = model(x), model(x + 0.5)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got2).all()


def test_compiled_model_keeps_names_and_copies_are_eager():
    model = reduced("tome").eval()
    names = list(model.state_dict())
    compile_model(model, backend="eager")
    assert is_compiled(model) and list(model.state_dict()) == names
    twin = copy.deepcopy(model)
    assert not is_compiled(twin)
    with torch.no_grad():
        torch.testing.assert_close(twin(images(1)), model(images(1)))


class _Sampler(ReductionMethod):
    """A stand-in for an ATS-like method: how many tokens it keeps depends on the image."""

    name = "dynamic_test_only"
    static_schedule = False


def test_dynamic_schedule_is_compiled_without_fullgraph_and_refused_with_it(caplog):
    model = apply_reduction(tiny_vit(), "none")
    model.reduction = _Sampler(model)
    assert not static_schedule(model)
    with pytest.raises(ValueError, match="depends on the image.*fullgraph=False"):
        compile_model(model, fullgraph=True, backend="eager")
    with caplog.at_level("INFO", logger="src.models.compile"):
        compile_model(model, backend="eager")
    assert "fullgraph=False" in caplog.text and is_compiled(model)
    with torch.no_grad():
        assert model(images(1)).shape == (1, 10)
