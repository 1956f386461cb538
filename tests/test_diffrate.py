"""DiffRate: reference semantics, token counts, protected tokens, identity, gradients, errors, GMACs
(the golden logits are checked in test_golden.py)."""

from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.models.deit import VisionTransformerDistilled

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from src.models.reduction.diffrate import (
    RateSearch,
    merge_into_kept,
    search_forward,
    search_kept_numbers,
)
from tests.tiny import images, tiny_vit

SCHEDULES = Path(__file__).resolve().parents[1] / "conf" / "diffrate_schedule"
# 65 tokens (64 patches + CLS) through the 4 blocks of the tiny ViT; block 2's prune count is above
# what is left (a no-op), block 0 only merges
PRUNE = [65, 50, 60, 20]
MERGE = [60, 40, 30, 12]


# --- an independent, loop-by-block rendering of OpenGVLab/DiffRate's inference path ---------------
def diffrate_reference_logits(model, x, prune, merge):
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    B = t.shape[0]
    size = torch.ones(B, t.shape[1], 1, dtype=t.dtype)
    for blk, kp, km in zip(model.blocks, prune, merge):
        B, N, C = t.shape
        a = blk.attn
        qkv = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * a.scale + size.log()[:, None, None, :, 0]).softmax(dim=-1)
        t = t + a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        imp = attn[:, :, 0, 1:].mean(dim=1)
        order = torch.cat([torch.zeros(B, 1, dtype=torch.long), imp.argsort(dim=1, descending=True) + 1], dim=1)
        t = torch.stack([t[b, order[b]] for b in range(B)])[:, :kp]
        size = torch.stack([size[b, order[b]] for b in range(B)])[:, :kp]
        n = t.shape[1]
        if km < n:
            new_t, new_size = [], []
            for b in range(B):
                keep, rest = t[b, :km].clone(), t[b, km:]
                unit = t[b] / t[b].norm(dim=-1, keepdim=True)
                sim = unit[km:] @ unit[:km].T
                sim[:, 0] = -float("inf")
                best, partner = sim.max(dim=-1)
                s = size[b, :km].clone()
                for dst in range(km):
                    members = (partner == dst).nonzero()[:, 0]
                    if len(members):
                        keep[dst] = torch.cat([t[b, dst : dst + 1], rest[members]]).mean(dim=0)
                        s[dst] = s[dst] + (size[b, km:][members, 0] * best[members]).sum()
                new_t.append(keep)
                new_size.append(s)
            t, size = torch.stack(new_t), torch.stack(new_size)
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t))


def expected_counts(prune, merge, n):
    out = []
    for p, m in zip(prune, merge):
        n = min(n, p, m)
        out.append(n)
    return out


def test_matches_reference_semantics():
    model = tiny_vit().double()
    x = images().double()
    with torch.no_grad():
        expected = diffrate_reference_logits(model, x, PRUNE, MERGE)
        got = apply_reduction(model, "diffrate", prune_kept_num=PRUNE, merge_kept_num=MERGE)(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_merge_rule():
    """Receivers become the plain mean of their group; their sizes grow by each sender's size times
    its similarity; CLS never receives."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [3.0, 0.1]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0], [1.0]]])
    new_x, new_size, _ = merge_into_kept(x, size, None, kept=3, num_protected=1)
    # token 3 (0, 2) -> token 1 (0, 1), similarity 1; token 4 (3, 0.1) -> token 2 (1, 1), not CLS (1, 0)
    sim4 = (3 + 0.1) / (torch.tensor([3.0, 0.1]).norm() * torch.tensor([1.0, 1.0]).norm())
    torch.testing.assert_close(new_x, torch.tensor([[[1.0, 0.0], [0.0, 1.5], [2.0, 0.55]]]))
    torch.testing.assert_close(new_size, torch.tensor([[[1.0], [2.0 + 3.0], [1.0 + sim4]]]))


def test_token_counts_per_block(deit_tiny, images):
    sched = yaml.safe_load((SCHEDULES / "deit_t_0.7.yaml").read_text())
    state = apply_reduction(deit_tiny, "diffrate", **sched).forward_tokens(images[:2])
    assert state.tokens_per_block == expected_counts(sched["prune_kept_num"], sched["merge_kept_num"], 197)
    assert state.tokens_per_block[-1] == 3 and state.x.shape == (2, 3, 192)


def test_cls_stays_first_and_sources_partition_the_kept_image():
    model, x = tiny_vit(), images(2)
    apply_reduction(model, "diffrate", prune_kept_num=PRUNE, merge_kept_num=MERGE, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(x)
    assert state.tokens_per_block == [60, 40, 30, 12]
    eye = torch.eye(65)
    assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))  # CLS first, standing for itself only
    assert state.source.sum(1).max() == 1  # no patch in two tokens (pruned ones are in none)
    assert state.size.dtype == state.x.dtype and state.size[:, 0].eq(1).all()


def test_distillation_token_is_protected():
    model = tiny_vit(cls=VisionTransformerDistilled)
    apply_reduction(
        model, "diffrate", prune_kept_num=[60, 40, 30, 20], merge_kept_num=[50, 40, 20, 10], trace_source=True
    )
    with torch.no_grad():
        state = model.forward_tokens(images(2))
    assert state.tokens_per_block == [50, 40, 20, 10]
    eye = torch.eye(66)
    assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))
    assert torch.equal(state.source[:, 1], eye[1].expand(2, -1))


def test_no_reduction_equals_unpatched_timm():
    plain, x = tiny_vit(), images()
    with torch.no_grad():
        expected = plain(x)
        for params in ({}, {"prune_kept_num": [65] * 4, "merge_kept_num": [1.0] * 4}):
            model = apply_reduction(tiny_vit(), "diffrate", **params)
            assert torch.equal(model(x), expected)
            assert model.forward_tokens(x).tokens_per_block == [65] * 4


def test_fractions_of_the_patch_tokens():
    model = tiny_vit()
    frac = apply_reduction(
        model, "diffrate", prune_kept_num=[1.0, 0.5, 0.25, 0.25], merge_kept_num=[0.75, 0.5, 0.2, 0.1]
    ).reduction
    assert frac.prune_kept_num == [65, 33, 17, 17] and frac.merge_kept_num == [49, 33, 14, 7]


def test_gradients_flow_in_train_mode():
    model = apply_reduction(tiny_vit().train(), "diffrate", prune_kept_num=PRUNE, merge_kept_num=MERGE)
    state = model.forward_tokens(images(2))
    assert state.tokens_per_block == [60, 40, 30, 12]
    model.forward_head_state(state).square().mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "params,match",
    [
        ({"prune_kept_num": [65] * 3}, r"prune_kept_num has 3 entries but the model has 4 blocks"),
        ({"merge_kept_num": [65, 66, 30, 20]}, r"merge_kept_num\[1\]=66: .* int in \[2, 65\]"),
        ({"prune_kept_num": [65, 1, 30, 20]}, r"prune_kept_num\[1\]=1: .* int in \[2, 65\]"),
        ({"prune_kept_num": [65, True, 30, 20]}, r"prune_kept_num\[1\]=True"),
        ({"prune_kept_num": [65, 1.5, 30, 20]}, r"prune_kept_num\[1\]=1.5: .* in \(0, 1\]"),
        ({"prune_kept_num": 60}, r"prune_kept_num=60: give a list with one kept-token count per block \(4"),
    ],
)
def test_bad_parameters_are_clear_errors_at_apply_time(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(), "diffrate", **params)


def test_published_deit_s_schedule_gmacs():
    """compression_rate.json's DeiT-S 2.9 G schedule: the README reports 2.905 GFLOPs."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    sched = yaml.safe_load((SCHEDULES / "deit_s_2.9.yaml").read_text())
    assert abs(count_gmacs(apply_reduction(model, "diffrate", **sched)) - 2.905) < 0.002


# --- the differentiable search of the kept counts ---------------------------------------------------
def _set_choices(rates, prune, merge, num_patches=64):
    with torch.no_grad():
        for choices, counts in ((rates.prune, prune), (rates.merge, merge)):
            for choice, k in list(zip(choices, counts))[1:]:  # block 0 is fixed at every token
                choice.logits.zero_()
                choice.logits[num_patches - (k - 1)] = 50.0  # candidates: 64, 63, ... patch tokens


def test_search_gmacs_are_the_counted_gmacs_of_the_schedule():
    model, rates = tiny_vit(), RateSearch(tiny_vit())
    _set_choices(rates, [65, 60, 50, 40], [65, 56, 44, 30])
    assert rates.kept_numbers() == ([65, 60, 50, 40], [65, 56, 44, 30])
    with torch.no_grad():
        logits, gmacs = search_forward(model, rates, images(2))
    assert logits.shape == (2, 10)
    counted = count_gmacs(
        apply_reduction(tiny_vit(), "diffrate", prune_kept_num=[65, 60, 50, 40], merge_kept_num=[65, 56, 44, 30]), 64, 3
    )
    assert abs(gmacs.item() - counted) < 0.002 * counted  # the counter also sees the CLS-attention rows


def test_search_task_loss_and_flops_penalty_reach_the_rates():
    model, rates = tiny_vit(), RateSearch(tiny_vit())
    with torch.no_grad():
        rates.merge[2].logits[40:] = 2.0  # block 2 prefers merging down to fewer than the ~34 pruning keeps
    assert rates.kept_numbers()[1][2] < rates.kept_numbers()[0][2]
    logits, gmacs = search_forward(model, rates, images(2))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward(retain_graph=True)
    assert rates.prune[1].logits.grad.abs().sum() > 0 and rates.merge[2].logits.grad.abs().sum() > 0  # via the masks
    block0 = rates.prune[0].logits.grad
    assert block0 is None or block0.abs().sum() == 0  # block 0 is never compressed
    rates.zero_grad()
    gmacs.backward()
    assert rates.prune[3].logits.grad.abs().sum() > 0  # via the expected counts


def test_search_reaches_the_budget_with_the_backbone_frozen():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = count_gmacs(model, 64, 3)
    torch.manual_seed(0)
    data = [(images(8, seed=s), torch.randint(0, 10, (8,))) for s in range(2)]
    prune, merge = search_kept_numbers(
        model, data, target_gmacs=0.7 * base, epochs=20, lr=0.3, min_lr=0.03, flops_weight=1e5
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(q.requires_grad for q in model.parameters()) and not model.training
    counted = count_gmacs(apply_reduction(tiny_vit(), "diffrate", prune_kept_num=prune, merge_kept_num=merge), 64, 3)
    assert abs(counted - 0.7 * base) <= 0.05 * 0.7 * base, (prune, merge, counted / base)
    with pytest.raises(ReductionConfigError, match="target_gmacs=0"):
        search_kept_numbers(model, data, target_gmacs=0)
