"""Dense maps (forward_tokens(x, dense=True) -> state.dense_map) of every method, checked against
independent computations (source tracing and hooks on the blocks), and ViTDetBackbone over every method."""

import copy

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

from src.models import ReductionConfigError, apply_reduction
from src.models.detection import ViTDetBackbone
from src.models.reduction import REGISTRY, ReductionMethod
from tests.test_detection import _vit as detection_vit
from tests.tiny import images, tiny_vit

# a setting that really removes tokens on the tiny ViT (8x8 patches, 4 blocks), for every method
REDUCING = {
    "none": {},
    "ats": dict(blocks=[1, 2, 3]),
    "bat": dict(keep_rate=0.5, locations=[0, 1, 2]),
    "diffrate": dict(prune_kept_num=[60, 50, 40, 30], merge_kept_num=[55, 40, 30, 20]),
    "dynamicvit": dict(keep_rate=0.5, locations=[1, 2, 3]),
    "evit": dict(keep_rate=0.5, locations=[0, 1, 2]),
    "gtp": dict(r=6),
    "mctf": dict(r=6),
    "mstm": dict(keep_rate=0.5, locations=[0, 1, 2]),
    "pitome": dict(ratio=0.8),
    "ppt": dict(r=10, locations=[0, 1, 2]),
    "stvit": dict(block=1, pool_size=2, recover=True),
    "tofu": dict(ratio=0.8),
    "tome": dict(r=6),
}
# settings that remove nothing (the model is the unpatched one)
IDENTITY = {
    "ats": dict(blocks=[]),
    "bat": dict(keep_rate=1.0),
    "diffrate": {},
    "evit": dict(keep_rate=1.0),
    "gtp": dict(r=0),
    "mctf": dict(r=0),
    "mstm": dict(keep_rate=1.0),
    "pitome": dict(ratio=1.0),
    "ppt": dict(r=0),
    "tofu": dict(ratio=1.0),
    "tome": dict(r=0),
}
PREFIXES = {"cls": {}, "distilled": dict(cls=VisionTransformerDistilled), "registers": dict(reg_tokens=2)}


def _model(method, prefix="cls", **params):
    return apply_reduction(tiny_vit(**PREFIXES[prefix]), method, **{**REDUCING[method], **params})


def _pre_norm(model, x, **kwargs):
    """(state, the final tokens entering the model's final norm)."""
    seen = {}
    handle = model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            state = model.forward_tokens(x, **kwargs)
    finally:
        handle.remove()
    return state, seen["x"]


def _grid(tokens, grid=(8, 8)):
    """(B, M, C) patch tokens -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def test_every_registered_method_declares_how_it_restores_the_map():
    assert set(REGISTRY) == set(REDUCING)  # a new method: add a reducing setting above
    for name, cls in REGISTRY.items():
        assert "dense_restore" in vars(cls) and cls.dense_restore in ("tokens", "source", "own"), name
    assert ReductionMethod.dense_restore == "tokens"  # the identity method


@pytest.mark.parametrize("prefix", list(PREFIXES))
@pytest.mark.parametrize("method", sorted(REDUCING))
def test_map_shape_and_unchanged_forward(method, prefix):
    model = _model(method, prefix)
    x = images(2)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(0)
            plain = model.forward_tokens(x)
            torch.manual_seed(0)
            dense = model.forward_tokens(x, dense=True)
        assert plain.dense_map is None and plain.source is None  # nothing tracked unless asked
        assert dense.dense_map.shape == (2, 48, 8, 8) and torch.isfinite(dense.dense_map).all()
        # the dense pass is the same forward pass: same tokens, same logits, bit for bit
        assert torch.equal(dense.x, plain.x) and dense.tokens_per_block == plain.tokens_per_block
        assert torch.equal(model.forward_head_state(dense), model.forward_head_state(plain))
        if method != "none" and not training:
            assert plain.tokens_per_block[-1] < 64 + model.num_prefix_tokens  # the setting does reduce


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_none_map_is_the_final_patch_tokens_before_the_norm(prefix):
    model = _model("none", prefix)
    state, final = _pre_norm(model, images(2), dense=True)
    assert torch.equal(state.dense_map, _grid(final[:, model.num_prefix_tokens :]))


@pytest.mark.parametrize("method", sorted(IDENTITY))
def test_settings_that_remove_nothing_give_the_unreduced_map(method):
    base = tiny_vit()
    none = apply_reduction(copy.deepcopy(base), "none")
    model = apply_reduction(base, method, **IDENTITY[method])
    x = images(2)
    with torch.no_grad():
        expected = none.forward_tokens(x, dense=True).dense_map
        got = model.forward_tokens(x, dense=True)
    assert got.tokens_per_block == [65] * 4
    assert torch.equal(got.dense_map, expected)


def test_dynamicvit_keep_rate_one_gives_the_unreduced_map():
    # every token stays, but re-ordered by score: the map puts them back (sums in another order)
    base = tiny_vit()
    none = apply_reduction(copy.deepcopy(base), "none")
    model = apply_reduction(base, "dynamicvit", keep_rate=1.0, locations=[1, 2, 3])
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_tokens(x, dense=True).dense_map, none.forward_tokens(x, dense=True).dense_map
        )


# --- merging: every patch gets the final features of the token it was merged into --------------------
@pytest.mark.parametrize(
    "method,params",
    [
        ("tome", {}),
        ("mctf", {}),
        ("pitome", {}),
        ("bat", {}),
        ("mstm", {}),
        ("tofu", dict(strategy="mean")),
        ("ppt", dict(threshold=1.0)),  # every image pooled
    ],
)
@pytest.mark.parametrize("prefix", ["cls", "registers"])
def test_merged_patches_take_the_final_features_of_their_token(method, params, prefix):
    model = _model(method, prefix, **params)
    x = images(2)
    with torch.no_grad():
        dense = model.forward_tokens(x, dense=True).dense_map
    model.trace_source = True
    state, final = _pre_norm(model, x)
    p = model.num_prefix_tokens
    source = state.source[:, :, p:]
    assert torch.equal(source.sum(1), torch.ones(2, 64))  # every patch in exactly one token
    assert state.num_tokens < 64 + p
    expected = torch.full((2, 64, 48), float("nan"))
    for b in range(2):
        for t in range(state.num_tokens):
            members = source[b, t] > 0
            expected[b, members] = final[b, t]
    assert torch.equal(dense, _grid(expected))


# --- pruning and propagation: a removed patch gets the features its token had when removed ----------
def _removal_reference(model, x, removes_in="after_attention", claims=lambda s: s):
    """The dense map built independently: block by block, the patches that no token claims any more
    (source tracing, `claims` = the claiming part of a source map) take the features their token had
    in that block, seen through hooks: between attention residual and MLP (x_in + attention branch) for
    a method removing in after_attention, the block's input for one removing in before_block."""
    depth, p = len(model.blocks), model.num_prefix_tokens
    seen, hooks = {}, []
    for k, blk in enumerate(model.blocks):
        hooks.append(blk.norm1.register_forward_pre_hook(lambda m, a, k=k: seen.__setitem__(("in", k), a[0])))
        hooks.append(blk.ls1.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(("attn", k), o)))
    model.trace_source = True
    try:
        state, final = _pre_norm(model, x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        outputs = [model.forward_tokens(x, last_block=k) for k in range(depth - 1)] + [state]
    model.trace_source = False
    B = x.shape[0]
    expected = torch.full((B, 64, final.shape[-1]), float("nan"))
    owner = torch.arange(p, p + 64).expand(B, 64)
    claimed = torch.ones(B, 64, dtype=torch.bool)
    removed = 0
    for k in range(depth):
        src = claims(outputs[k].source)[:, :, p:]
        now = src.amax(1) > 0
        lost = claimed & ~now
        if removes_in == "after_attention":
            feats = seen[("in", k)] + seen[("attn", k)]
        else:
            feats = outputs[k - 1].x
        for b in range(B):
            expected[b, lost[b]] = feats[b, owner[b, lost[b]]]
        removed += int(lost.sum())
        owner, claimed = src.argmax(1), now
    for b in range(B):
        expected[b, claimed[b]] = final[b, owner[b, claimed[b]]]
    assert removed > 0 and not expected.isnan().any()
    return _grid(expected)


@pytest.mark.parametrize(
    "method,params,removes_in",
    [
        ("evit", dict(fuse_token=False), "after_attention"),
        ("dynamicvit", {}, "before_block"),
        ("gtp", {}, "after_attention"),  # propagated tokens: their features at propagation time
        ("ats", {}, "after_attention"),  # padding rows claim nothing
        ("diffrate", {}, "after_attention"),  # pruning and merging
        ("ppt", dict(threshold=0.0), "after_attention"),  # every image pruned
    ],
)
@pytest.mark.parametrize("prefix", ["cls", "registers"])
def test_removed_patches_take_their_features_at_removal(method, params, removes_in, prefix):
    model = _model(method, prefix, **params)
    x = images(2)
    with torch.no_grad():
        dense = model.forward_tokens(x, dense=True).dense_map
    assert torch.equal(dense, _removal_reference(model, x, removes_in))


def test_evit_fused_token_claims_no_patch():
    """The fused token only summarises the dropped tokens: their patches keep their own features at the
    moment they were dropped, not the fused token's (a kept patch token's source row has one patch)."""
    model = _model("evit", fuse_token=True)
    x = images(2)
    with torch.no_grad():
        dense = model.forward_tokens(x, dense=True)
    p = model.num_prefix_tokens
    assert (dense.source[:, -1] == 0).all()  # in the dense pass the fused token's row is empty
    own = lambda s: s * (s[:, :, p:].sum(-1, keepdim=True) == 1)  # noqa: E731 (patch tokens claim, fused don't)
    assert torch.equal(dense.dense_map, _removal_reference(model, x, "after_attention", claims=own))
    model.trace_source = True  # the visualisation still sees the fused token standing for the dropped patches
    with torch.no_grad():
        traced = model.forward_tokens(x)
    assert torch.equal(traced.source[:, p:, p:].sum(1), torch.ones(2, 64))


def test_dynamicvit_training_masked_patches_keep_their_features_at_masking():
    model = _model("dynamicvit").train()
    x = images(2)
    torch.manual_seed(3)
    with torch.no_grad():
        state = model.forward_tokens(x, dense=True, collect=range(4))
    outs, decisions = state.extras["intermediates"], state.extras["dynamicvit"]["decisions"]
    locations = model.reduction.locations
    expected = outs[-1][:, 1:].clone()  # all tokens stay in training
    kept = torch.ones(2, 64, dtype=torch.bool)
    masked = 0
    for loc, dec in zip(locations, decisions):
        newly = kept & (dec < 0.5)
        expected[newly] = outs[loc - 1][:, 1:][newly]  # the block input of the masking stage
        kept &= dec >= 0.5
        masked += int(newly.sum())
    assert masked > 0
    assert torch.equal(state.dense_map, _grid(expected))


# --- STViT -----------------------------------------------------------------------------------------
def test_stvit_r_map_is_the_recovered_map_and_plain_stvit_refuses():
    model = _model("stvit")
    with torch.no_grad():
        state = model.forward_tokens(images(2), dense=True)
    assert state.dense_map is state.extras["recovered"] and state.source is None  # no tracing needed
    plain = _model("stvit", recover=False)
    with pytest.raises(ReductionConfigError, match="recover=True"):
        plain.forward_tokens(images(1), dense=True)
    with pytest.raises(ReductionConfigError, match="recover=True"):
        ViTDetBackbone(plain)
    with pytest.raises(ValueError, match="last_block"):
        model.forward_tokens(images(1), dense=True, last_block=1)


def test_dense_map_of_an_early_stop_is_that_blocks_map():
    model = _model("tome")
    x = images(2)
    with torch.no_grad():
        early = model.forward_tokens(x, dense=True, last_block=1)
        again = model.forward_tokens(x, dense=True, last_block=1)
    assert early.tokens_per_block == [59, 53] and early.dense_map.shape == (2, 48, 8, 8)
    assert torch.equal(early.dense_map, again.dense_map)


@pytest.mark.parametrize("method", ["evit", "tome"])
def test_dense_pass_compiles_as_one_graph(method):
    from src.models.compile import compile_model

    model = _model(method)
    x = images(2)
    with torch.no_grad():
        ref = model.forward_tokens(x, dense=True).dense_map
        compile_model(model, backend="eager")  # fullgraph=True: a graph break would be an error
        assert torch.equal(model.forward_tokens(x, dense=True).dense_map, ref)


# --- ViTDetBackbone over every method ----------------------------------------------------------------
def _det_vit(method):
    return apply_reduction(detection_vit("none"), method, **REDUCING[method])  # the bare tiny detection ViT


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_vitdet_backbone_takes_every_method(method):
    bb = ViTDetBackbone(_det_vit(method), out_channels=16, scale_factors=(2.0, 1.0, 0.5, 0.25))
    out = bb(torch.randn(2, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3", "pool"] and bb.strides == [4, 8, 16, 32, 64]
    for name, stride in zip(out, bb.strides):
        assert out[name].shape == (2, 16, -(-64 // stride), -(-96 // stride)), name
        assert torch.isfinite(out[name]).all()
    sum(o.sum() for o in out.values()).backward()
    assert bb.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the map is differentiable


@pytest.mark.parametrize("method", ["none", "stvit"])
def test_vitdet_backbone_map_is_unchanged_for_none_and_stvit_r(method):
    bb = ViTDetBackbone(_det_vit(method), out_channels=16).eval()
    x = torch.randn(2, 3, 64, 96)
    state, final = _pre_norm(bb.vit, x)
    expected = state.extras["recovered"] if method == "stvit" else _grid(final[:, 1:], (8, 12))
    with torch.no_grad():
        assert torch.equal(bb.spatial_map(x), expected)


@pytest.mark.parametrize("method", sorted(m for m, cls in REGISTRY.items() if cls.claims_every_patch))
@pytest.mark.parametrize("training", [False, True])
def test_methods_that_skip_removal_records_leave_no_patch_unclaimed(method, training):
    """claims_every_patch lets a dense pass skip record_removed: only true if every patch ends in a token."""
    model = _model(method, "registers").train(training)
    model.trace_source = True
    with torch.no_grad():
        state = model.forward_tokens(images(2))
    p = model.num_prefix_tokens
    assert state.num_tokens < 64 + p and (state.source[:, :, p:].amax(1) > 0).all()
    assert sorted(m for m, cls in REGISTRY.items() if cls.claims_every_patch) == ["pitome", "tofu", "tome"]
