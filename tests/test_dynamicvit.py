"""DynamicViT: predictors, masked-softmax training path, top-k inference path, losses, checkpoints."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from src.models import ReductionConfigError, WeightsError, apply_reduction, load_weights, remove_reduction
from src.models.reduction.base import AttentionRequest, TokenState, attention
from src.models.reduction.dynamicvit import DynamicViT, PredictorLG, policy_softmax
from tests import golden


def tiny(depth=4, img=32, **kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10, **kw)


def patched(keep_rate=0.7, locations=(1, 2, 3), **kw):
    model = tiny(**kw)
    apply_reduction(model, "dynamicvit", keep_rate=keep_rate, locations=list(locations))
    return model


# --- an independent transcription of the reference forward (VisionTransformerDiffPruning) --------
def ref_masked_softmax(attn, policy, eps=1e-6):
    B, N, _ = policy.shape
    p = policy.reshape(B, 1, 1, N)
    p = p + (1.0 - p) * torch.eye(N, dtype=p.dtype).view(1, 1, N, N)
    a = (attn - attn.max(dim=-1, keepdim=True)[0]).float().exp() * p.float()
    return ((a + eps / N) / (a.sum(dim=-1, keepdim=True) + eps)).type_as(attn)


def ref_block(blk, x, policy):
    B, N, C = x.shape
    H = blk.attn.num_heads
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1)) * blk.attn.scale
    a = a.softmax(dim=-1) if policy is None else ref_masked_softmax(a, policy)
    x = x + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
    return x + blk.mlp(blk.norm2(x))


def ref_predictor(pred, x, prev):
    x = pred.in_conv(x)
    B, N, C = x.shape
    g = (x[:, :, C // 2 :] * prev).sum(dim=1, keepdim=True) / prev.sum(dim=1, keepdim=True)
    return pred.out_conv(torch.cat([x[:, :, : C // 2], g.expand(B, N, C // 2)], dim=-1))


def ref_forward(model, images, keep_rate, locations, training):
    """Returns (logits, normed tokens, decisions, final prev) as the reference does."""
    ratios = [keep_rate, keep_rate**2, keep_rate**3, keep_rate**4][: len(locations)]
    x = model._pos_embed(model.patch_embed(images))
    B, n = x.shape[0], x.shape[1] - 1
    prev = torch.ones(B, n, 1, dtype=x.dtype)
    policy = torch.ones(B, n + 1, 1, dtype=x.dtype)
    decisions = []
    for i, blk in enumerate(model.blocks):
        if i in locations:
            s = locations.index(i)
            score = ref_predictor(model.score_predictor[s], x[:, 1:], prev)
            if training:
                hard = F.gumbel_softmax(score, hard=True)[:, :, 0:1] * prev
                decisions.append(hard.reshape(B, n))
                policy = torch.cat([torch.ones(B, 1, 1, dtype=x.dtype), hard], dim=1)
                prev = hard
            else:
                keep = torch.argsort(score[:, :, 0], dim=1, descending=True)[:, : int(n * ratios[s])]
                idx = torch.cat([torch.zeros(B, 1, dtype=keep.dtype), keep + 1], dim=1)
                x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                prev = prev.gather(1, keep[..., None])
        x = ref_block(blk, x, policy if training else None)
    x = model.norm(x)
    return model.head(x[:, 0]), x[:, 1:], decisions, prev


# --- predictors and checkpoint keys ---------------------------------------------------------------
OFFICIAL_SUFFIXES = [
    "in_conv.0.weight",
    "in_conv.0.bias",
    "in_conv.1.weight",
    "in_conv.1.bias",
    "out_conv.0.weight",
    "out_conv.0.bias",
    "out_conv.2.weight",
    "out_conv.2.bias",
    "out_conv.4.weight",
    "out_conv.4.bias",
]


def test_predictor_shapes_and_official_keys():
    model = patched()
    keys = [k for k in model.state_dict() if k.startswith("score_predictor.")]
    assert keys == [f"score_predictor.{s}.{k}" for s in range(3) for k in OFFICIAL_SUFFIXES]
    p = model.score_predictor[0]
    assert p.in_conv[1].weight.shape == (32, 32)
    assert [tuple(p.out_conv[j].weight.shape) for j in (0, 2, 4)] == [(16, 32), (8, 16), (2, 8)]
    out = p(torch.randn(3, 16, 32), torch.ones(3, 16, 1))
    assert out.shape == (3, 16, 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 16))  # log-probabilities
    assert model.reduction.new_module_names() == ["score_predictor"]
    assert DynamicViT.needs_teacher is True


def test_predictor_global_feature_ignores_dropped_tokens():
    torch.manual_seed(0)
    p = PredictorLG(32)
    with torch.no_grad():
        for m in p.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(8.0)  # away from the near-uniform init so scores move visibly
    x = torch.randn(1, 6, 32)
    prev = torch.tensor([1.0, 1, 0, 1, 0, 1]).view(1, 6, 1)
    out = p(x, prev)
    x2 = x.clone()
    x2[:, 2] = torch.randn(32) * 3  # a dropped token: changes only its own local score, not the others' global feature
    out2 = p(x2, prev)
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out[:, others], out2[:, others])
    assert not torch.allclose(out[:, 2], out2[:, 2])


def test_image_with_every_token_dropped_stays_finite():
    """The reference divides 0/0 here (NaN); the guard gives a zero global feature instead and
    leaves every other image untouched."""
    torch.manual_seed(0)
    p = PredictorLG(32)
    x = torch.randn(2, 6, 32)
    prev = torch.ones(2, 6, 1)
    prev[1] = 0.0  # image 1: every token dropped at an earlier stage
    out = p(x, prev)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], p(x[:1], prev[:1]))
    torch.testing.assert_close(out[:1], ref_predictor(p, x[:1], prev[:1]))


def test_training_with_few_patches_has_no_nan():
    """16 patches and near-uniform fresh predictors: some images lose every token by stage 3."""
    model = patched(0.9, [0, 1, 2, 3]).train()
    torch.manual_seed(0)
    state = model.forward_tokens(torch.randn(64, 3, 32, 32))
    dropped_all = (state.extras["dynamicvit"]["decisions"][2].sum(1) == 0).sum()  # before the 4th predictor
    assert dropped_all > 0, "the test needs an image with every token dropped"
    assert torch.isfinite(state.x).all()
    assert all(v == v for v in model.reduction.metrics(state).values())


def test_strict_checkpoint_loading_official_layout():
    model = patched()
    sd = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    fresh = patched()
    load_weights(fresh, {"model": sd})  # official DynamicViT files nest the weights under "model"
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    del sd["score_predictor.1.out_conv.2.weight"]
    with pytest.raises(WeightsError, match=r"score_predictor\.1\.out_conv\.2\.weight"):
        load_weights(patched(), sd)
    # a plain DeiT checkpoint lacks every predictor key: strict loading says so
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith("score_predictor")}
    with pytest.raises(WeightsError, match="missing keys \\(30\\)"):
        load_weights(patched(), plain)


def test_reapply_keeps_trained_predictors_and_refuses_mismatched():
    """Re-applying never silently re-initialises trained predictors: same layout keeps them, another
    layout is an error that leaves the model as it was, until the modules are dropped on purpose."""
    model = patched()
    w = model.score_predictor[0].in_conv[1].weight
    apply_reduction(model, "dynamicvit", keep_rate=0.5, locations=[1, 2, 3])
    assert model.score_predictor[0].in_conv[1].weight is w
    with pytest.raises(ReductionConfigError, match="score_predictor.*remove_reduction"):
        apply_reduction(model, "dynamicvit", keep_rate=0.5, locations=[1, 3])
    assert model.score_predictor[0].in_conv[1].weight is w and model.reduction.keep_rate == 0.5
    remove_reduction(model, drop_modules=True)
    assert not hasattr(model, "score_predictor")
    apply_reduction(model, "dynamicvit", keep_rate=0.5, locations=[1, 3])
    assert len(model.score_predictor) == 2


# --- masking semantics ------------------------------------------------------------------------------
def test_policy_softmax_hides_dropped_keys_but_each_token_sees_itself():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    policy = torch.tensor([[1.0, 1, 0, 1, 0], [1.0, 0, 1, 1, 1]]).view(2, 5, 1)
    a = policy_softmax(logits, policy)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 5))
    # every query row is a softmax over the kept keys plus itself (the rest only get the eps share)
    visible = policy.view(2, 1, 1, 5).bool() | torch.eye(5, dtype=torch.bool)
    expected = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(a, expected, atol=1e-4, rtol=0)
    for b in range(2):
        for j in range(5):
            if policy[b, j, 0] == 0:
                others = [q for q in range(5) if q != j]
                assert a[b][:, others, j].max() < 1e-4  # invisible to every other query
                assert a[b][:, j, j].min() > 1e-2  # but sees itself
    # with everything kept it is the plain softmax up to the reference's eps
    torch.testing.assert_close(policy_softmax(logits, torch.ones(2, 5, 1)), logits.softmax(-1), atol=1e-6, rtol=0)


def test_dropped_token_cannot_influence_other_tokens_in_attention():
    model = tiny()
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32)
    policy = torch.tensor([1.0, 1, 1, 0, 1, 1]).view(1, 6, 1)
    req = AttentionRequest(softmax=lambda lg: policy_softmax(lg, policy))
    out = attention(attn, x, req).out
    x2 = x.clone()
    x2[:, 3] = torch.randn(32) * 10
    out2 = attention(attn, x2, req).out
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(out[:, keep], out2[:, keep], atol=1e-5, rtol=0)
    assert (out[:, 3] - out2[:, 3]).abs().max() > 1e-2  # it still attends to itself


# --- reference semantics --------------------------------------------------------------------------
@pytest.mark.parametrize("keep_rate,locations", [(0.7, [1, 2, 3]), (0.5, [0, 2]), (0.9, [3])])
def test_eval_path_matches_reference_transcription(keep_rate, locations):
    model = patched(keep_rate, locations).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for pred in model.score_predictor:  # larger weights: clear score margins
            for m in pred.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(8.0)
        images = torch.randn(3, 3, 32, 32)
        ref_logits, _, _, _ = ref_forward(model, images, keep_rate, locations, training=False)
        torch.testing.assert_close(model(images), ref_logits, atol=1e-5, rtol=1e-5)


def test_training_path_matches_reference_transcription():
    model = patched(0.6, [1, 2, 3]).train()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    state = model.forward_tokens(images)
    logits = model.forward_head(state.x)
    torch.manual_seed(5)
    ref_logits, ref_tokens, ref_dec, ref_prev = ref_forward(model, images, 0.6, [1, 2, 3], training=True)
    ex = state.extras["dynamicvit"]
    for d, rd in zip(ex["decisions"], ref_dec):
        assert torch.equal(d, rd)
    assert torch.equal(ex["prev"], ref_prev)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.x[:, 1:], ref_tokens, atol=1e-5, rtol=1e-5)
    assert state.tokens_per_block == [17] * 4  # training keeps every token physically
    # the decisions are nested: a token dropped at one stage stays dropped
    d0, d1, d2 = ex["decisions"]
    assert (d1 <= d0).all() and (d2 <= d1).all()


@pytest.mark.parametrize("keep_rate,locations", [(0.7, [3, 6, 9]), (0.5, [2, 5, 8]), (0.8, [4, 8])])
def test_golden_weights_eval_variants_match_reference_transcription(keep_rate, locations):
    """Other keep rates / locations on the golden DeiT-T weights (the hidden cases' kind)."""
    golden.require_golden()
    case = next(c for c in golden.cases("dynamicvit"))
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    sd = golden.case_state_dict(case)
    apply_reduction(model, "dynamicvit", keep_rate=keep_rate, locations=locations)
    if len(locations) != 3:
        sd = {
            k: v for k, v in sd.items() if not k.startswith("score_predictor.") or int(k.split(".")[1]) < len(locations)
        }
    load_weights(model, sd)
    model.eval()
    images = golden.inputs()[:2]
    with torch.no_grad():
        state = model.forward_tokens(images)
        ref_logits, _, _, _ = ref_forward(model, images, keep_rate, locations, training=False)
    torch.testing.assert_close(model.forward_head(state.x), ref_logits, atol=1e-4, rtol=1e-4)
    n = 196
    expected, count = [], n + 1
    for i in range(12):
        if i in locations:
            count = 1 + int(n * keep_rate ** (locations.index(i) + 1))
        expected.append(count)
    assert state.tokens_per_block == expected


# --- inference token counts, protected CLS, identities ---------------------------------------------
def test_inference_token_counts_compound():
    model = patched(0.7, [1, 2, 3]).eval()
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 32, 32))
    # 16 patches: int(16 * 0.7) = 11, int(16 * 0.49) = 7, int(16 * 0.343) = 5
    assert state.tokens_per_block == [17, 12, 8, 6]
    assert model.reduction.metrics(state) == pytest.approx(
        {
            "keep_ratio_stage0": 11 / 16,
            "keep_ratio_stage1": 7 / 16,
            "keep_ratio_stage2": 5 / 16,
            "keep_ratio_target_stage0": 0.7,
            "keep_ratio_target_stage1": 0.49,
            "keep_ratio_target_stage2": 0.343,
        }
    )


def test_counts_use_the_actual_patch_count():
    model = tiny(img=32, dynamic_img_size=True)
    apply_reduction(model, "dynamicvit", keep_rate=0.7, locations=[1, 2, 3])
    model.eval()
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(1, 3, 48, 48))  # 36 patches, not the nominal 16
    assert state.tokens_per_block == [37, 1 + 25, 1 + 17, 1 + 12]


def test_cls_token_stays_first_and_protected():
    model = patched(0.5, [0, 1, 2]).eval()
    model.trace_source = True
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 32, 32))
    assert state.source[:, 0, 0].eq(1).all() and state.source[:, 0, 1:].eq(0).all()
    assert state.source[:, 1:, 0].eq(0).all()  # no patch token stands for CLS
    assert state.tokens_per_block == [1 + 8, 1 + 4, 1 + 2, 1 + 2]


def test_keep_rate_one_equals_unpatched_model():
    base = tiny().eval()
    model = copy.deepcopy(base)
    apply_reduction(model, "dynamicvit", keep_rate=1.0, locations=[1, 2, 3])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), base(x), atol=1e-5, rtol=1e-5)
        assert model.forward_tokens(x).tokens_per_block == [17] * 4


def test_eval_batch_independence():
    model = patched(0.5, [1, 2]).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# --- losses -------------------------------------------------------------------------------------------
def fake_state(decisions, prev, x, training=True):
    state = TokenState(x=x, num_protected=1, grid_size=(2, 2), training=training)
    state.extras["dynamicvit"] = {"decisions": decisions, "prev": prev, "kept": []}
    return state


def test_keep_ratio_loss_on_hand_made_decisions():
    model = patched(0.7, [1, 2])  # targets 0.7 and 0.49
    method = model.reduction
    d0 = torch.zeros(2, 10)
    d0[0, :7] = 1  # image 0 keeps 7/10 -> error 0
    d0[1, :5] = 1  # image 1 keeps 5/10 -> error -0.2
    d1 = torch.zeros(2, 10)
    d1[0, :5] = 1  # 0.5 vs 0.49 -> 0.01
    d1[1, :4] = 1  # 0.4 vs 0.49 -> -0.09
    expected = (0.0 + 0.2**2) / 2 + (0.01**2 + 0.09**2) / 2  # 0.0241
    assert method.ratio_loss([d0, d1]).item() == pytest.approx(expected, abs=1e-7)
    x = torch.randn(2, 11, 4)
    state = fake_state([d0, d1], d1[..., None], x)
    terms = method.losses(
        state,
        logits=torch.zeros(2, 3),
        teacher_logits=torch.zeros(2, 3),
        teacher_state=fake_state([], None, x.clone()),
        targets=None,
        epoch=0,
        step=0,
    )
    # weighted: ratio_weight 2.0 / 2 stages
    assert terms["ratio"].item() == pytest.approx(2.0 * expected / 2, abs=1e-7)
    assert terms["cls_distill"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["token_distill"].item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_terms_on_hand_made_inputs():
    model = patched(0.7, [1])
    method = model.reduction
    prev = torch.tensor([[1.0, 0, 1, 0], [0.0, 0, 0, 1]])[..., None]  # final kept patch tokens
    x = torch.zeros(2, 5, 3)
    t = torch.zeros(2, 5, 3)
    t[0, 1] = 1.0  # kept token of image 0: squared error 3 (over 3 channels)
    t[0, 2] = 100.0  # dropped token: must not count
    t[1, 0] = 100.0  # CLS: must not count
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    t_logits = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    terms = method.losses(
        fake_state([prev[..., 0]], prev, x),
        logits=logits,
        teacher_logits=t_logits,
        teacher_state=fake_state([], None, t),
        targets=None,
        epoch=0,
        step=0,
    )
    kl = (0.25 * torch.log(torch.tensor(0.25 / 0.5)) + 0.75 * torch.log(torch.tensor(0.75 / 0.5))) / 2
    assert terms["cls_distill"].item() == pytest.approx(0.5 * kl.item(), rel=1e-5)
    # 3 kept tokens x 3 channels, total squared error 3 -> mean 1/3
    assert terms["token_distill"].item() == pytest.approx(0.5 * 3 / 9, rel=1e-6)
    with pytest.raises(ValueError, match="teacher_state"):
        method.losses(fake_state([prev[..., 0]], prev, x), logits=logits, teacher_logits=t_logits, teacher_state=None)
    assert method.losses(fake_state([], prev, x, training=False), logits=logits) == {}


def test_gradients_reach_predictors_and_backbone():
    model = patched(0.5, [1, 2]).train()
    teacher = tiny().eval()
    apply_reduction(teacher, "none")
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    state = model.forward_tokens(x)
    logits = model.forward_head(state.x)
    with torch.no_grad():
        t_state = teacher.forward_tokens(x)
        t_logits = teacher.forward_head(t_state.x)
    terms = model.reduction.losses(
        state, logits=logits, targets=None, teacher_logits=t_logits, teacher_state=t_state, epoch=0, step=0
    )
    assert set(terms) == {"ratio", "cls_distill", "token_distill"}
    (F.cross_entropy(logits, torch.arange(4)) + sum(terms.values())).backward()
    for s, pred in enumerate(model.score_predictor):
        g = pred.out_conv[4].weight.grad
        assert g is not None and g.abs().sum() > 0, f"stage {s} predictor gets no gradient"
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    metrics = model.reduction.metrics(state)
    assert set(metrics) == {
        "keep_ratio_stage0",
        "keep_ratio_stage1",
        "keep_ratio_target_stage0",
        "keep_ratio_target_stage1",
    }
    assert 0.0 <= metrics["keep_ratio_stage1"] <= metrics["keep_ratio_stage0"] <= 1.0


def test_training_at_low_keep_rate_is_finite():
    model = patched(0.3, [1, 2, 3], img=64).train()  # 64 patches: eval counts 19, 5, 1
    torch.manual_seed(0)
    state = model.forward_tokens(torch.randn(8, 3, 64, 64) * 5)
    logits = model.forward_head(state.x)
    assert torch.isfinite(logits).all() and torch.isfinite(state.x).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- configuration errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,match",
    [
        ({"keep_rate": 0.0}, "keep_rate must be a number in \\(0, 1\\]"),
        ({"keep_rate": 1.5}, "keep_rate must be a number in \\(0, 1\\]"),
        ({"keep_rate": "0.7"}, "keep_rate"),
        (
            {"locations": [1, 9]},
            r"location 9 is not a block index of this 4-block model; use a 0-based int in \[0, 3\]",
        ),
        ({"locations": [2, 1]}, "strictly increasing"),
        ({"locations": []}, "non-empty list"),
        ({"locations": 2}, "non-empty list"),
        ({"keep_rate": 0.1, "locations": [1, 2, 3]}, "keeps int\\(16 \\* 0.001\\) = 0 patch tokens"),
        ({"ratio_weight": -1.0}, "ratio_weight must be a number >= 0"),
        ({"distill_weight": float("nan")}, "distill_weight"),
        ({"bogus": 1}, "does not take \\['bogus'\\]"),
    ],
)
def test_bad_parameters_raise_before_any_forward(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny(), "dynamicvit", **{"locations": [1, 2, 3], **params})


def test_average_pool_model_is_rejected():
    with pytest.raises(ReductionConfigError, match="global_pool='token'"):
        apply_reduction(tiny(global_pool="avg"), "dynamicvit", locations=[1, 2, 3])


# --- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_py_finetune_lowers_the_keep_ratio_loss(tmp_path):
    """train.py experiment=dynamicvit_digits with tiny settings (fresh quickstart weights, no teacher
    bootstrap, backbone frozen): the predictors learn the keep ratios within 16 steps."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "train.py",
        "experiment=dynamicvit_digits",
        "model.bootstrap.enabled=false",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "profile.enabled=false",
        "ema.enabled=false",
        "callbacks=none",
        "logger=csv",
        "optim.backbone_freeze_epochs=2",
        "optim.lr=1e-2",
        "optim.lr_base_batch=16",
        "optim.warmup_epochs=0",
        "data.batch_size=16",
        "data.eval_batch_size=50",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    ratio = {int(r["epoch"]): float(r["train/loss_ratio_epoch"]) for r in rows if r.get("train/loss_ratio_epoch")}
    assert set(ratio) == {0, 1} and all(v == v for v in ratio.values())
    assert ratio[1] < 0.6 * ratio[0], ratio
    val = next(r for r in rows if r.get("val/keep_ratio_stage0"))
    # inference keeps exactly int(16 * 0.7^(s+1)) of the 16 patch tokens
    assert [float(val[f"val/keep_ratio_stage{s}"]) for s in range(3)] == [11 / 16, 7 / 16, 5 / 16]
    # summary.json carries the last epoch's keep ratios next to their targets
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [summary[f"val_keep_ratio_stage{s}"] for s in range(3)] == [11 / 16, 7 / 16, 5 / 16]
    assert [summary[f"train_keep_ratio_target_stage{s}"] for s in range(3)] == pytest.approx([0.7, 0.49, 0.343])
    assert 0 < summary["train_keep_ratio_stage2"] <= summary["train_keep_ratio_stage0"] <= 1


def test_train_py_at_keep_rate_0_3_is_finite_with_clipping_on(tmp_path):
    """Low keep rates (0.3; two stages, since 16 patches cannot hold a third) train without NaN, and
    gradient clipping is on by default."""
    import csv
    import math
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "train.py",
        "experiment=dynamicvit_digits",
        "model.bootstrap.enabled=false",
        "method.params.keep_rate=0.3",
        "method.params.locations=[1,2]",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "profile.enabled=false",
        "ema.enabled=false",
        "callbacks=none",
        "logger=csv",
        "optim.backbone_freeze_epochs=0",
        "optim.warmup_epochs=0",
        "data.batch_size=16",
        "data.eval_batch_size=50",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())["trainer"]["gradient_clip_val"] == 5.0
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    losses = [float(v) for r in rows for k, v in r.items() if k.startswith("train/loss") and v]
    assert len(losses) >= 6 * 5 and all(math.isfinite(v) for v in losses)  # 5 loss terms, every step
    val = next(r for r in rows if r.get("val/keep_ratio_stage0"))
    assert [float(val[f"val/keep_ratio_stage{s}"]) for s in range(2)] == [
        4 / 16,
        1 / 16,
    ]  # int(16 * 0.3), int(16 * 0.09)
