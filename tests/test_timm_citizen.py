"""A patched model is a well-behaved nn.Module and timm model: it pickles and deep-copies, every timm
token path runs the reduced blocks, grad checkpointing recomputes the blocks, new modules follow the
model's device and dtype, and nothing from one call leaks into the next (inference_mode, no_grad,
autograd, threads)."""

import copy
import io
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from src.models import REGISTRY, ReductionConfigError, apply_reduction
from src.models.reduction.base import unreduced_copy
from tests.tiny import images, tiny_vit

ROOT = Path(__file__).resolve().parents[1]

# every method with settings that reduce on the tiny ViT (64 px, patch 8: 64 patches, 4 blocks)
SETTINGS = {
    "tome": dict(r=4),
    "evit": dict(keep_rate=0.5),
    "gtp": dict(r=4, num_neighbours=4),
    "dynamicvit": dict(keep_rate=0.7),
    "bat": dict(keep_rate=0.5),
    "mstm": dict(keep_rate=0.5),
    "stvit": dict(block=1, pool_size=2, recover=True),
    "mctf": dict(r=6),
    "ppt": dict(r=10),
    "diffrate": dict(prune_kept_num=[60, 50, 40, 30], merge_kept_num=[56, 44, 36, 24]),
}
METHODS = {m: SETTINGS.get(m, {}) for m in sorted(REGISTRY)}  # a new method joins with its defaults
REDUCING = [m for m in METHODS if m != "none"]


def reduced(method, seed=0, **kw):
    return apply_reduction(tiny_vit(seed, **kw), method, **METHODS[method])


@pytest.mark.parametrize("method", METHODS)
def test_pickle_deepcopy_and_torch_save_roundtrip(method):
    model, x = reduced(method), images()
    with torch.no_grad():
        expected = model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buf, weights_only=False)):
            assert type(other) is type(model) and other.reduction.name == method
            assert torch.equal(other(x), expected)
    # the copies are independent: training one changes nothing in the other
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.weight.add_(1.0)
    assert not torch.equal(twin.head.weight, model.head.weight)


def test_unpickles_in_a_fresh_process(tmp_path):
    """What spawn-based DDP and serving stacks do: the reduced class is rebuilt from importable names."""
    model, x = reduced("gtp"), images()
    torch.save({"model": model, "x": x, "y": model(x).detach()}, tmp_path / "m.pt")
    code = (
        "import torch; d = torch.load(r'%s', weights_only=False); m = d['model']; "
        "assert type(m).__name__ == 'ReducedVisionTransformer' and m.reduction.name == 'gtp'; "
        "torch.testing.assert_close(m(d['x']), d['y'], rtol=0, atol=0); print('ok')" % (tmp_path / "m.pt")
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("method", REDUCING)
def test_forward_intermediates_are_the_reduced_tokens(method):
    model, x = reduced(method), images(2)
    with torch.no_grad():
        state = model.forward_tokens(x, collect=(0, 1, 2, 3))
        final, feats = model.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NLC")
        only = model.get_intermediate_layers(x, n=2)  # the last two blocks, NLC (timm's default reshape=False)
    p = model.num_prefix_tokens
    assert [f.shape[1] + p for f in feats] == state.tokens_per_block  # token counts of the reduced blocks
    for got, want in zip(feats, state.extras["intermediates"]):
        assert torch.equal(got, want[:, p:])
    assert torch.equal(final, state.x)
    assert [t.shape for t in only] == [f.shape for f in feats[2:]]
    assert state.tokens_per_block[-1] < 65  # it really reduced (the unreduced model keeps 65)


def test_forward_intermediates_spatial_map_only_where_the_grid_is_whole():
    model, x = reduced("evit"), images(2)  # EViT reduces at blocks 1, 2, 3 of 4 (64 -> 32 kept + 1 fused)
    with torch.no_grad():
        _, (first,) = model.forward_intermediates(x, indices=[0])  # before any reduction: the 8x8 grid
        assert first.shape == (2, 48, 8, 8)
        with pytest.raises(ValueError, match=r"block 1 .* holds 33 patch tokens, not the 8x8 grid.*output_fmt='NLC'"):
            model.forward_intermediates(x, indices=[1])
        # unreduced: identical to timm's own forward_intermediates
        plain = tiny_vit(0)
        ref = plain.forward_intermediates(x, indices=[1, 3], output_fmt="NCHW", norm=True)
        ours = apply_reduction(tiny_vit(0), "none").forward_intermediates(x, indices=[1, 3], norm=True)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["tome", "gtp", "dynamicvit", "stvit"])
def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(method):
    x = images(2)
    grads, calls = [], []
    for ckpt in (False, True):
        model = reduced(method).train()
        model.set_grad_checkpointing(ckpt)
        count = [0]
        for blk in model.blocks:  # fc1, not the whole MLP: recomputation stops early after fc2's input
            blk.mlp.fc1.register_forward_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))
        torch.manual_seed(5)  # DynamicViT's Gumbel noise: the same draws in both runs
        out = model(x)
        loss = out.float().pow(2).mean() if isinstance(out, torch.Tensor) else out
        forward_only = count[0]
        loss.backward()
        calls.append((forward_only, count[0]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls[0] == (4, 4)  # no checkpointing: each block's MLP runs once
    assert calls[1] == (4, 8)  # checkpointing: every block's MLP runs again in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["dynamicvit", "mstm", "stvit"])
def test_new_modules_follow_the_model_dtype_and_device(method):
    model = tiny_vit(0).double()
    apply_reduction(model, method, **METHODS[method])
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        assert model(images(2).double()).dtype == torch.float64
    meta = tiny_vit(0).to("meta")
    # (STViT-R's recovery block starts as a copy of the last block's weights, which a meta model lacks)
    apply_reduction(meta, method, **{**METHODS[method], **({"recover": False} if method == "stvit" else {})})
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.mark.parametrize("method", METHODS)
def test_inference_mode_then_no_grad_then_training(method):
    """Lightning validates under inference_mode; the same model must then run under no_grad and train."""
    model, x = reduced(method), images(2)
    with torch.inference_mode():
        a = model(x)
    with torch.no_grad():
        b = model(x)
    assert torch.equal(a, b)
    model.train()
    out = model(x)
    out.float().mean().backward()
    model.eval()
    with torch.inference_mode():
        assert torch.equal(model(x), a)


def test_threads_share_a_model_safely():
    """Concurrent forward passes (a serving stack's worker threads) give each caller its own result."""
    model = reduced("gtp")
    inputs = [images(n, seed=s) for n, s in ((1, 1), (3, 2), (2, 3), (4, 4))]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results = [None] * len(inputs)

    def work(k):
        with torch.no_grad():
            for _ in range(3):
                results[k] = model(inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_unreduced_copy_is_the_plain_timm_model():
    model = reduced("dynamicvit")
    plain = unreduced_copy(model)
    assert type(plain).__name__ == "VisionTransformer" and not hasattr(plain, "score_predictor")
    assert hasattr(model, "score_predictor") and model.reduction.name == "dynamicvit"
    ref = tiny_vit(0)
    with torch.no_grad():
        assert torch.equal(plain(images()), ref(images()))


def test_reapplying_with_other_settings_keeps_or_refuses():
    model = reduced("stvit")
    centre = model.stvit_centre.weight
    apply_reduction(model, "stvit", block=1, pool_size=2, recover=True)  # same layout: kept
    assert model.stvit_centre.weight is centre
    with pytest.raises(ReductionConfigError, match="stvit_centre"):
        apply_reduction(model, "stvit", block=1, pool_size=3, recover=True)  # 9 semantic tokens: another layout
    assert model.stvit_centre.weight is centre and model.reduction.pool_size == (2, 2)
