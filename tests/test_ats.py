"""ATS: reference semantics (padding, masked softmax, plain blocks between ATS blocks), token counts,
CLS first, batch dependence, identity, gradients, errors (the golden logits are in test_golden.py)."""

import pytest
import torch

from src.models import ReductionConfigError, apply_reduction
from src.models.compile import static_schedule
from src.models.export import export_blocker
from src.models.reduction.ats import masked_softmax, sample_tokens
from tests.tiny import images, tiny_vit


# --- an independent rendering of adaptivetokensampling/ATS (padded rows + 0/1 policy, per-image loops) --
def ats_reference_logits(model, x, blocks, drop_tokens, eps=1e-6):
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    B, n0, C = t.shape
    policy = torch.ones(B, n0, 1, dtype=t.dtype)
    counts = []
    for i, blk in enumerate(model.blocks):
        B, N, C = t.shape
        a = blk.attn
        qkv = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        if i in blocks:
            qkv = qkv * policy[None, :, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * a.scale
        cols = policy.reshape(B, 1, 1, N)
        allowed = cols + (1 - cols) * torch.eye(N, dtype=t.dtype)
        e = (logits - logits.max(dim=-1, keepdim=True).values).exp() * allowed
        attn = (e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)
        out = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        if i not in blocks:
            t = (t + out) * policy
        else:
            vnorm = v.transpose(1, 2).reshape(B, N, C).norm(dim=-1)
            score = (attn[:, :, 0].sum(dim=1) * vnorm)[:, 1:]
            score = score / score.sum(dim=1, keepdim=True)
            S = n0 - 1
            rows = []
            for b in range(B):
                s, order = score[b].sort()
                cdf = s.cumsum(0)
                c = (cdf - cdf.min()) / (cdf.max() - cdf.min())
                start = c[c > 0].min()
                ys = start + (torch.linspace(0, 1, S, dtype=c.dtype) * (S - 1) - start * torch.arange(S)) / (S - 1)
                picks = sorted({int((y - c).abs().argmin()) for y in ys})
                rows.append([0] + [int(order[j]) + 1 for j in picks])
            width = max(map(len, rows)) if drop_tokens else N
            new_t = t.new_zeros(B, width, C)
            policy = t.new_zeros(B, width, 1)
            for b, r in enumerate(rows):
                new_t[b, : len(r)] = (t + out)[b, r]
                policy[b, : len(r)] = 1
            t = new_t
        t = (t + blk.mlp(blk.norm2(t))) * policy
        counts.append(policy[:, :, 0].sum(1).long())
    return model.forward_head(model.norm(t)), torch.stack(counts, 1)


@pytest.mark.parametrize("blocks,drop_tokens", [([1, 3], True), ([0, 1, 2, 3], True), ([1, 3], False)])
def test_matches_reference_semantics(blocks, drop_tokens):
    model = tiny_vit().double()
    x = images(4).double()
    with torch.no_grad():
        expected, counts = ats_reference_logits(model, x, blocks, drop_tokens)
        apply_reduction(model, "ats", blocks=blocks, drop_tokens=drop_tokens)
        state = model.forward_tokens(x)
        got = model.forward_head_state(state)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert torch.equal(torch.stack(state.extras["tokens_per_image"], 1), counts)
    assert counts[:, -1].max() < 65 and counts[:, -1].min() < counts[:, -1].max()  # it reduced, unevenly


def test_token_counts_are_the_padded_rows():
    model = apply_reduction(tiny_vit(), "ats", blocks=[1, 2, 3])
    with torch.no_grad():
        state = model.forward_tokens(images(4))
    per_image = torch.stack(state.extras["tokens_per_image"], 1)  # (B, blocks), real tokens incl. CLS
    assert state.tokens_per_block == per_image.max(0).values.tolist()
    assert state.tokens_per_block[0] == 65 and per_image[:, 0].eq(65).all()  # block 0 is a plain block
    assert (per_image[:, 1:] <= per_image[:, :-1]).all() and state.tokens_per_block[-1] < 65
    assert torch.equal(state.size[:, :, 0].sum(1).long(), per_image[:, -1])  # policy = real rows
    # padding rows are zero, real rows come first
    real = state.size[:, :, 0].bool()
    assert torch.equal(real, torch.arange(real.shape[1]) < per_image[:, -1:])
    without = apply_reduction(tiny_vit(), "ats", blocks=[1, 2, 3], drop_tokens=False)
    with torch.no_grad():
        assert without.forward_tokens(images(4)).tokens_per_block == [65] * 4


def test_cls_stays_first_and_padding_stands_for_nothing():
    model = apply_reduction(tiny_vit(), "ats", blocks=[1, 2, 3], trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(images(4))
    eye = torch.eye(65)
    assert torch.equal(state.source[:, 0], eye[0].expand(4, -1))
    assert torch.equal(state.source.sum(-1), state.size[:, :, 0])  # a real token is one patch, padding none
    assert state.source.sum(1).max() == 1  # no patch twice
    padding = state.size[:, :, 0] == 0
    assert padding.any() and (state.x[padding] == model.norm.bias).all()  # zero rows through the final norm


def test_kept_tokens_follow_ascending_score_and_zero_cdf_is_never_picked():
    score = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.0, 0.0, 0.5, 0.5]])
    order, picked, count = sample_tokens(score, 4)
    assert order.tolist()[0] == [0, 2, 3, 1]
    assert picked[0, 0].item() is False and picked[0, -1].item() is True  # lowest score: c = 0, never picked
    assert picked[1, :2].tolist() == [False, False] and count[1].item() >= 1  # padding rows (score 0) never picked


def test_masked_softmax_adds_eps_and_masks_padding():
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    plain = masked_softmax(logits, None, ats_block=False)
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    torch.testing.assert_close(plain, (e + 1e-6 / 5) / (e.sum(-1, keepdim=True) + 1e-6), rtol=0, atol=1e-15)
    assert (plain - logits.softmax(-1)).abs().max() > 1e-9  # the eps is there
    policy = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)[..., None]
    logits[0, :, :, 3] = 50.0  # a padding column's logit would be the row maximum
    masked = masked_softmax(logits, policy, ats_block=True)
    assert masked[0, :, :, 3:].abs().max() == 0 and masked.dtype == torch.float64
    # in an ATS block padding keys are zero: their logits count as 0 in the row maximum
    real = logits[0, :, :, :3]
    m = real.amax(-1, keepdim=True).clamp(min=0.0)
    e = (real - m).exp()
    expected = (e + 1e-6 / 5) / (e.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(masked[0, :, :3, :3], expected[:, :3], rtol=0, atol=1e-15)
    torch.testing.assert_close(masked[1], plain[1], rtol=0, atol=0)  # no padding: the plain eps softmax
    # in a plain block the padding columns are masked but still take part in the maximum (and get eps/N)
    other = masked_softmax(logits, policy, ats_block=False)
    e = (real - 50.0).exp()
    torch.testing.assert_close(
        other[0, :, :3, :3], ((e + 1e-6 / 5) / (e.sum(-1, keepdim=True) + 1e-6))[:, :3], rtol=0, atol=1e-15
    )
    half = masked_softmax(logits.float().half(), None, ats_block=False)
    assert half.dtype == torch.float16


def test_batch_dependence_with_drop_tokens():
    """Documented reference behaviour: with drop_tokens an image's result depends on the other images of
    its batch (padding to the batch's largest kept count); without it, it does not."""
    x = images(4)
    for drop, dependent in ((True, True), (False, False)):
        model = apply_reduction(tiny_vit(), "ats", blocks=[1, 2, 3], drop_tokens=drop)
        with torch.no_grad():
            together = model(x)
            counts = torch.stack(model.forward_tokens(x).extras["tokens_per_image"], 1)
            alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        padded = counts[:, 1] < counts[:, 1].max()  # images with padding rows after the first ATS block
        assert padded.any()
        diff = (together - alone).abs().amax(1)
        if dependent:
            assert diff[padded].max() > 1e-3
        else:
            assert diff.max() < 1e-5


def test_no_ats_block_equals_unpatched_timm():
    plain, x = tiny_vit(), images()
    with torch.no_grad():
        model = apply_reduction(tiny_vit(), "ats", blocks=[])
        assert torch.equal(model(x), plain(x))
        assert model.forward_tokens(x).tokens_per_block == [65] * 4


def test_gradients_flow_in_train_mode():
    model = apply_reduction(tiny_vit().train(), "ats", blocks=[1, 2])
    state = model.forward_tokens(images(2))
    assert state.tokens_per_block[-1] < 65
    model.forward_head_state(state).square().mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0


def test_defaults_and_capabilities():
    model = apply_reduction(tiny_vit(), "ats")
    assert model.reduction.blocks == [1, 2, 3] and model.reduction.num_tokens == [65] * 4
    assert not static_schedule(model) and "depends on the image" in export_blocker(model)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"num_tokens": 64}, r"num_tokens=64: .* int >= 65"),
        ({"num_tokens": [65] * 3}, r"num_tokens has 3 entries but the model has 4 blocks"),
        ({"blocks": [1, 4]}, r"ats blocks? location 4 is not a block index of this 4-block model"),
        ({"blocks": 3}, r"ats blocks locations must be a list"),
        ({"drop_tokens": "yes"}, r"drop_tokens='yes' must be true"),
    ],
)
def test_bad_parameters_are_clear_errors_at_apply_time(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(), "ats", **params)
