"""GTP: reference semantics, graph, token counts, protected tokens, propagation, identity, errors, GMACs."""

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs, count_gmacs_split
from src.models.reduction.base import AttentionResult, TokenState
from src.models.reduction.gtp import GRAPH_KEY, SELECTIONS, build_graph, semantic_graph, spatial_graph
from tests.tiny import images, tiny_vit


# --- an independent rendering of GTP-ViT bb9991e models_v3.py (full graph re-gathered every block) ----
def reference_rank(attn, selection):
    diag = torch.diagonal(attn, dim1=-2, dim2=-1)[:, :, 1:]
    col = attn[:, :, :, 1:].sum(-2)
    if selection.startswith("cos_sim"):
        rows = attn[:, :, 1:, :].mean(1) if selection.endswith("mean") else attn[:, :, 1:, :].max(1)[0]
        rows = rows / rows.norm(dim=-1, keepdim=True)
        return -(rows @ rows.transpose(-1, -2)).sum(-1)
    reduce = (lambda t: t.mean(1)) if selection.endswith("mean") else (lambda t: t.max(1)[0])
    return {
        "cls_attn": lambda: reduce(attn[:, :, 0, 1:]),
        "img_attn": lambda: reduce(col),
        "diag_attn": lambda: reduce(diag),
        "mixed_attn": lambda: reduce(diag) * reduce(col),
        "sum_attn": lambda: reduce(diag) + reduce(col),
    }[selection.rsplit("_", 1)[0]]()


def gtp_reference_logits(model, x, r, alpha, graph, num_neighbours, selection, sparsity, token_scale):
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    B, N, C = t.shape
    M = N - 1
    side = int(M**0.5)
    spatial = torch.zeros(M, M, dtype=t.dtype)
    for i in range(M):
        for j in range(M):
            if i != j and abs(i // side - j // side) <= 1 and abs(i % side - j % side) <= 1:
                spatial[i, j] = 1.0
    xn = t[:, 1:] / t[:, 1:].norm(dim=-1, keepdim=True)
    sim = xn @ xn.transpose(-1, -2)
    thr = torch.kthvalue(sim, N - 1 - num_neighbours, dim=-1, keepdim=True)[0]
    semantic = torch.where(sim >= thr, 1.0, 0.0).to(t.dtype) - torch.eye(M, dtype=t.dtype)
    A = {
        "spatial": spatial.expand(B, M, M),
        "semantic": semantic,
        "mixed": torch.bitwise_or(semantic.int(), spatial.expand(B, M, M).int()).to(t.dtype),
    }[graph]
    D = torch.diag_embed(A.sum(-1) ** -0.5)
    W = D @ A @ D
    s = torch.ones(B, N, dtype=t.dtype) if token_scale else None
    for blk, P in zip(model.blocks, r):
        B, N, C = t.shape
        a = blk.attn
        qkv = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * a.scale) @ k.transpose(-2, -1)
        if s is not None:
            attn = attn + s.log().reshape(B, 1, 1, N)
        attn = attn.softmax(dim=-1)
        if sparsity < 1:
            kk = int(N * N * (1 - sparsity))
            thr = torch.kthvalue(attn.reshape(B, a.num_heads, -1), kk, dim=-1, keepdim=True)[0].unsqueeze(-1)
            attn[attn < thr] = 0.0
        t = t + a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        if P > 0:
            order = torch.argsort(reference_rank(attn, selection), dim=1, descending=True)
            ik, ip = order[:, :-P], order[:, -P:]  # graph indices (without CLS)
            x_kept = t.gather(1, (ik + 1)[..., None].expand(-1, -1, C))
            x_prop = t.gather(1, (ip + 1)[..., None].expand(-1, -1, C))
            W = W.gather(1, ik[..., None].expand(-1, -1, N - 1))
            W_prop = W.gather(2, ip[:, None].expand(-1, W.shape[1], -1))
            W = W.gather(2, ik[:, None].expand(-1, W.shape[1], -1))
            t = torch.cat([t[:, :1], x_kept + alpha * (W_prop @ x_prop)], dim=1)
            if s is not None:
                s_new = s[:, 1:].gather(1, ik) + alpha * (W_prop @ s[:, 1:].gather(1, ip)[..., None])[..., 0]
                s = torch.cat([s[:, :1], s_new], dim=1)
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t))


CONFIGS = [
    dict(r=6, alpha=0.1, graph="mixed", num_neighbours=8, selection="mixed_attn_max", sparsity=1.0, token_scale=True),
    dict(
        r=[5, 0, 9, 3],
        alpha=0.4,
        graph="semantic",
        num_neighbours=3,
        selection="mixed_attn_mean",
        sparsity=0.7,
        token_scale=True,
    ),
    dict(
        r=10, alpha=0.25, graph="spatial", num_neighbours=8, selection="sum_attn_max", sparsity=0.5, token_scale=False
    ),
] + [
    dict(r=7, alpha=0.2, graph="mixed", num_neighbours=5, selection=s, sparsity=0.9, token_scale=True)
    for s in SELECTIONS
    if s not in ("mixed_attn_max", "mixed_attn_mean", "sum_attn_max")
]


@pytest.mark.parametrize("params", CONFIGS, ids=[f"{c['selection']}-{c['graph']}" for c in CONFIGS])
def test_matches_reference_semantics(params):
    model = tiny_vit().double()
    x = images().double()
    r = params["r"] if isinstance(params["r"], list) else [params["r"]] * len(model.blocks)
    with torch.no_grad():
        expected = gtp_reference_logits(model, x, **{**params, "r": r})
        apply_reduction(model, "gtp", **params)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_spatial_graph_is_the_8_neighbourhood_of_the_actual_grid():
    g = spatial_graph((2, 3))  # 0 1 2 / 3 4 5
    expected = torch.tensor(
        [
            [0, 1, 0, 1, 1, 0],
            [1, 0, 1, 1, 1, 1],
            [0, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 1, 1, 0, 1],
            [0, 1, 1, 0, 1, 0],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(g, expected)
    assert spatial_graph((14, 14)).sum(-1).tolist().count(8.0) == 12 * 12  # interior tokens: 8 neighbours


def test_semantic_graph_has_k_neighbours_and_normalisation_is_symmetric_degree():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    sem = semantic_graph(x, 3)
    assert torch.equal(sem.sum(-1), torch.full((2, 16), 3.0, dtype=torch.float64))
    assert torch.equal(torch.diagonal(sem, dim1=-2, dim2=-1), torch.zeros(2, 16, dtype=torch.float64))
    mixed = build_graph(x, (4, 4), "mixed", 3)
    A = ((sem + spatial_graph((4, 4), dtype=torch.float64)) > 0).double()
    d = A.sum(-1) ** -0.5
    torch.testing.assert_close(mixed, d[:, :, None] * A * d[:, None, :], rtol=0, atol=0)


def test_token_counts_deit_tiny_and_protected_cls():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    apply_reduction(model, "gtp", trace_source=True, r=8)
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 224, 224))
    assert state.tokens_per_block == [197 - 8 * (i + 1) for i in range(12)]
    assert torch.equal(state.source[:, 0], torch.eye(197)[0].expand(2, -1))
    # kept tokens keep their own source rows: every remaining token stands for exactly one patch
    assert torch.equal(state.source.sum(-1), torch.ones(2, 101))
    assert state.size.shape == (2, 101, 1) and torch.all(state.size[:, 0] == 1) and torch.all(state.size[:, 1:] >= 1)


@pytest.mark.parametrize(
    "img_size,patch_size,r,expected_last",
    [(160, 16, 6, 101 - 24), (224, 32, 3, 50 - 12), ((48, 96), 16, 2, 19 - 8)],
)
def test_other_image_and_patch_sizes(img_size, patch_size, r, expected_last):
    model = tiny_vit(img_size=img_size, patch_size=patch_size)
    apply_reduction(model, "gtp", r=r, num_neighbours=4)
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        state = model.forward_tokens(x)
    assert state.tokens_per_block[-1] == expected_last
    assert [
        a - b for a, b in zip([state.tokens_per_block[0] + r] + state.tokens_per_block[:-1], state.tokens_per_block)
    ] == [r] * 4
    m = model.patch_embed.num_patches
    assert state.extras[GRAPH_KEY].shape == (2, m, m)


def test_distillation_token_is_protected():
    model = tiny_vit(cls=VisionTransformerDistilled)
    apply_reduction(model, "gtp", trace_source=True, r=5, num_neighbours=4)
    with torch.no_grad():
        state = model.forward_tokens(images(2))
    assert state.tokens_per_block == [61, 56, 51, 46]
    assert torch.equal(state.source[:, :2], torch.eye(66)[:2].expand(2, -1, -1))
    assert torch.all(state.size[:, :2] == 1)
    assert state.extras[GRAPH_KEY].shape == (2, 64, 64)  # the graph is over patches only


def test_propagation_is_additive_over_graph_neighbours_and_differentiable():
    model = tiny_vit(img_size=24, patch_size=8)  # 3 x 3 grid
    method = apply_reduction(model, "gtp", r=2, alpha=0.5, graph="spatial", selection="cls_attn_mean").reduction
    x = torch.randn(1, 10, 4, requires_grad=True)
    state = method.init_state(model, TokenState(x=x, num_protected=1, grid_size=(3, 3)))
    # CLS attention ranks patch 0 highest ... patch 8 lowest: patches 7 and 8 are propagated
    cls_row = torch.linspace(1.0, 0.1, 9)
    attn = torch.zeros(1, 3, 10, 10)
    attn[:, :, 0, 1:] = cls_row
    res = AttentionResult(out=torch.zeros_like(x), keys=torch.zeros(1, 3, 10, 16), attn=attn)
    out = method.after_attention(0, state, res)
    W = build_graph(x.detach()[:, 1:], (3, 3), "spatial", 8)[0]
    expected = x[0, 1:8] + 0.5 * (W[:7, 7:] @ x[0, 8:10])
    torch.testing.assert_close(out.x[0, 1:], expected)
    torch.testing.assert_close(out.size[0, 1:, 0], 1 + 0.5 * W[:7, 7:].sum(-1))
    # patch 8 (bottom-right) only reaches its neighbours 4, 5 and 7; 7 is removed too
    (grad,) = torch.autograd.grad(out.x[0, 1:].sum(), x)
    torch.testing.assert_close(grad[0, 9], torch.full((4,), 0.5 * float(W[[4, 5], 8].sum())))


def test_gradients_reach_every_block_in_training():
    model = tiny_vit().train()
    apply_reduction(model, "gtp", r=6, sparsity=0.8)
    model(images(2)).logsumexp(-1).sum().backward()
    for i, blk in enumerate(model.blocks):
        g = blk.attn.qkv.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"block {i}"


def test_batch_independence():
    model = tiny_vit()
    apply_reduction(model, "gtp", r=7, sparsity=0.8)
    x = images(4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0, [0, 0, 0, 0]])
def test_r_zero_is_the_unpatched_model(r):
    model = tiny_vit()
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        apply_reduction(model, "gtp", r=r)
        got = model(x)
    assert model.forward_tokens(x).tokens_per_block == [65] * 4
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_graph_follows_input_dtype():
    model = tiny_vit().double()
    apply_reduction(model, "gtp", r=4)
    with torch.no_grad():
        state = model.forward_tokens(images(1).double())
    assert state.extras[GRAPH_KEY].dtype == torch.float64 and state.size.dtype == torch.float64


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(r=-1), ">= 0"),
        (dict(r=16), "at most 63"),  # 4 blocks x 16 = 64 > 63 removable of 64 patches
        (dict(r=[1, 2]), "one int per block"),
        (dict(r=2.5), r"GTP r=2.5: a float is the fraction of the 64 patch tokens .* must be in \(0.0625, 1\)"),
        (dict(r="8"), "int or a per-block list"),
        (dict(selection="MixedAttnMax"), "unknown GTP selection"),
        (dict(selection="random"), "not provided"),
        (dict(graph="none"), "unknown GTP graph"),
        (dict(sparsity=0.0), "sparsity"),
        (dict(sparsity=1.5), "sparsity"),
        (dict(num_neighbours=0), "num_neighbours"),
        (dict(num_neighbours=64), "smaller than the number of patches"),
        (dict(alpha=-0.1), "alpha"),
        (dict(token_scale="yes"), "token_scale"),
        (dict(num_prop=4), "does not take"),
    ],
)
def test_bad_params_raise_at_apply_time(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(), "gtp", **params)


def test_model_without_class_token_is_rejected():
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=False, global_pool="avg"
    )
    with pytest.raises(ReductionConfigError, match="class token"):
        apply_reduction(model, "gtp", r=1)


def _analytic_gmacs(r, C=768, depth=12, patches=196, patch=16, classes=1000):
    """Per block 4NC^2 + 2N^2C (attention on N tokens) + 8N'C^2 (MLP on N - r tokens), + embed + head."""
    total, n = patches * C * 3 * patch * patch + C * classes, patches + 1
    for _ in range(depth):
        total += 4 * n * C * C + 2 * n * n * C + 8 * (n - r) * C * C
        n -= r
    return total / 1e9


def test_gmacs_deit_base():
    """Published (ToMe-equal) GMACs with every graph; the semantic graph's cost is counted as side work."""
    model = timm.create_model("deit_base_patch16_224", pretrained=False)
    C = 768
    similarity = 196 * 196 * C / 1e9  # the semantic graph's cosine similarity, M^2 C
    for r, published in [(4, 15.3), (8, 13.1), (14, 9.8), (16, 8.8)]:
        apply_reduction(model, "gtp", r=r, graph="spatial")
        spatial, spatial_side = count_gmacs_split(model)
        # the propagation products W_prop @ x_prop and W_prop @ s_prop: (N-1-r) x r x (C + 1) per block
        propagation = sum((196 - r * (i + 1)) * r * (C + 1) for i in range(12)) / 1e9
        assert abs(spatial - published) <= 0.05, (r, spatial)
        assert abs(spatial - _analytic_gmacs(r) - propagation) < 1e-6, (r, spatial)
        assert spatial_side == 0.0
        apply_reduction(model, "gtp", r=r)  # the default mixed graph
        mixed, mixed_side = count_gmacs_split(model)
        assert abs(mixed - published) <= 0.05, (r, mixed)
        assert abs(mixed - spatial) < 1e-9, (r, mixed, spatial)
        assert abs(mixed_side - similarity) < 1e-9, (r, mixed_side)
        assert count_gmacs(model) == mixed


def test_inference_map_buffer_is_reused_within_a_call_and_changes_nothing(monkeypatch):
    """Without autograd GTP's attention maps share one CPU buffer per forward pass (allocated once,
    by the first propagating block); outputs are identical to fresh maps, also for other batch sizes."""
    from src.models.reduction import base

    model = apply_reduction(tiny_vit(), "gtp", r=2)
    x = images(3)
    allocations = []
    real_empty = torch.empty

    def counting_empty(*a, **k):
        allocations.append(a)
        return real_empty(*a, **k)

    with torch.no_grad():
        monkeypatch.setattr(base.torch, "empty", counting_empty)
        shared = model(x)
        assert len(allocations) == 1  # one buffer for all four blocks
        small = model(x[:1])
        assert len(allocations) == 2  # a new call, a new buffer: nothing outlives the call
        monkeypatch.setattr(base.torch, "empty", real_empty)
        model.reduction.attention_request = _fresh_maps(model.reduction.attention_request)
        fresh, fresh_small = model(x), model(x[:1])
    assert torch.equal(shared, fresh) and torch.equal(small, fresh_small)


def _fresh_maps(request):
    def without_buffer(i, state):
        req = request(i, state)
        req.transient_map = False
        return req

    return without_buffer
