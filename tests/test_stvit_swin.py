"""STViT-R-Swin (changsn/STViT-R classification model): structure, parameter count, GMACs, training."""

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from src.models.backbone import create_backbone
from src.models.profile import count_gmacs, count_params
from src.models.stvit_swin import GenerationBlock, SemanticBlock, SemanticStage, STViTRSwin, checkpoint_filter_fn


@pytest.fixture(scope="module")
def swin_s():
    torch.manual_seed(0)
    return timm.create_model("stvit_r_swin_small").eval()


def test_swin_s_parameter_count_and_gmacs_match_the_reference(swin_s):
    # log/small.txt (fvcore): 49.626M parameters, 5.826 GFLOPs. The counter here counts matmuls,
    # convolutions and attention only; fvcore also counts norms, BN and pooling (~0.03 G).
    assert count_params(swin_s) == 49_625_518
    gmacs = count_gmacs(swin_s)
    assert gmacs == pytest.approx(5.80, abs=0.01)
    assert 5.826 - 0.05 < gmacs < 5.826


def test_stage3_block_pattern_and_parameter_split(swin_s):
    stage = swin_s.layers[2]
    assert isinstance(stage, SemanticStage) and len(stage.blocks) == 18
    kinds = [type(b) for b in stage.blocks]
    assert (
        kinds == [SwinTransformerBlock, GenerationBlock, SemanticBlock, SemanticBlock, SemanticBlock, SemanticBlock] * 3
    )
    assert [stage.blocks[i].group for i in (2, 3, 4, 5)] == [None, 3, None, None]
    assert all(b.shift_size == (0, 0) for b in stage.blocks[::6])
    # reference table: layers.2.blocks 31.958M; stage 4 blocks 14.184M; conv stem 43.056K
    assert count_params(stage) == pytest.approx(31.958e6, abs=1e3)
    assert count_params(swin_s.layers[3]) == pytest.approx(14.184e6, abs=1e3)
    assert count_params(swin_s.patch_embed) == 43_056
    assert stage.semantic_token2 is None  # USE_GLOBAL=False in the released runs


def test_semantic_tokens_shapes():
    torch.manual_seed(0)
    stage = SemanticStage(48, (14, 14), 6, 3, 7, 3, 4.0, [0.0] * 6, use_global=True).eval()
    x = torch.randn(2, 14, 14, 48)
    s = stage.blocks[1](stage.blocks[0](x))
    assert s.shape == (2, 36, 48)
    assert stage(x).shape == (2, 14, 14, 48)


def test_semantic_token_order_is_raster_over_windows():
    """The 9 tokens pooled from window (r, c) land at rows 3r..3r+2, cols 3c..3c+2 of the 6x6 grid."""
    torch.manual_seed(0)
    blk = GenerationBlock(16, num_heads=2, mlp_ratio=4.0, drop_path=0.0, layer_scale_init=1.0).eval()
    x = torch.zeros(1, 14, 14, 16)
    x[:, 11:, :3] = torch.randn(16)  # inside window (1, 0) and only in the key window of (1, 0)
    with torch.no_grad():
        s = blk(x).reshape(6, 6, 16)
    differs = (s - s[0, 0]).abs().sum(-1) > 1e-4
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[3:, :3] = True
    assert torch.equal(differs, expected)


def test_forward_backward_from_scratch_tiny():
    torch.manual_seed(0)
    model = STViTRSwin(
        num_classes=5, embed_dim=24, depths=(1, 1, 6, 1), num_heads=(1, 2, 3, 4), drop_path_rate=0.1, use_global=True
    )
    x = torch.randn(2, 3, 224, 224)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    stage = model.layers[2]
    for i, blk in enumerate(stage.blocks):
        grads = [p.grad for p in blk.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"stage-3 block {i}"
    assert stage.semantic_token2.grad.abs().sum() > 0


def test_created_by_name_from_a_model_config():
    cfg = dict(
        name="stvit_r_swin_tiny",
        pretrained=False,
        checkpoint=None,
        num_classes=7,
        img_size=224,
        in_chans=3,
        drop_path_rate=0.2,
        kwargs={"use_global": False},
    )
    model = create_backbone(cfg)
    assert isinstance(model, STViTRSwin) and model.num_classes == 7
    assert count_params(model) == 28_320_214 - (1000 - 7) * 769


def test_bad_sizes_and_pretrained_are_clear_errors():
    with pytest.raises(ValueError, match="img_size=224"):
        STViTRSwin(img_size=256)
    with pytest.raises(ValueError, match="trained from scratch"):
        timm.create_model("stvit_r_swin_small", pretrained=True)


def test_official_key_names_map_by_renaming_only():
    """The documented mapping of STViT-R-Swin-*.pth["model"] names (tensors untouched); this
    project's own names pass unchanged. Loading and logits: tests/test_checkpoints.py."""
    t = torch.zeros(1)
    official = {
        "patch_embed.proj.0.c.weight": t,
        "patch_embed.proj.0.bn.running_mean": t,
        "patch_embed.proj.2.c.weight": t,
        "patch_embed.proj.2.bn.num_batches_tracked": t,
        "layers.2.downsample.reduction.weight": t,
        "layers.0.downsample.norm.bias": t,
        "layers.0.blocks.1.attn.relative_position_index": t,
        "layers.1.blocks.1.attn_mask": t,
        "layers.2.blocks.3.attn.kv.weight": t,
        "layers.3.blocks.0.attn.relative_position_bias_table": t,
        "norm.weight": t,
        "head.bias": t,
    }
    out = checkpoint_filter_fn(official)
    assert out == {
        "patch_embed.proj.0.weight": t,
        "patch_embed.proj.1.running_mean": t,
        "patch_embed.proj.3.weight": t,
        "patch_embed.proj.4.num_batches_tracked": t,
        "downsamples.2.reduction.weight": t,
        "downsamples.0.norm.bias": t,
        "layers.2.blocks.3.attn.kv.weight": t,
        "layers.3.blocks.0.attn.relative_position_bias_table": t,
        "norm.weight": t,
        "head.bias": t,
    }
    assert all(out[k] is v for k, v in out.items() if k in official)
    own = STViTRSwin(num_classes=5, embed_dim=24, depths=(1, 1, 6, 1), num_heads=(1, 2, 3, 4)).state_dict()
    assert checkpoint_filter_fn(own).keys() == own.keys()


def test_model_names_and_aliases():
    """stvit_swin_{t,s,b} (the golden set's names) and stvit_r_swin_{tiny,small,base} build the same
    classifier; features_only=True builds the detection backbone (tests/test_stvit_swin_det.py)."""
    from src.models.stvit_swin_det import STViTRSwinDet

    for short, long in (("t", "tiny"), ("s", "small"), ("b", "base")):
        a = timm.create_model(f"stvit_swin_{short}", num_classes=3, embed_dim=24, num_heads=(1, 2, 3, 4))
        b = timm.create_model(f"stvit_r_swin_{long}", num_classes=3, embed_dim=24, num_heads=(1, 2, 3, 4))
        assert type(a) is type(b) is STViTRSwin
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    det = timm.create_model("stvit_swin_t", features_only=True)
    assert isinstance(det, STViTRSwinDet)
    # the same parameters as the classifier, minus norm and head, plus norm0..3 (methods note, section 3)
    cls = timm.create_model("stvit_swin_t")
    assert count_params(cls) == 28_320_214 and count_params(det) == 27_552_558
    own, other = set(det.state_dict()), set(cls.state_dict())
    assert other - own == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert own - other == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
