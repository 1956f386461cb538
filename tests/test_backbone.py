"""create_backbone / build_model: sizes, checkpoints of every supported kind, head mismatch, missing
weights, the build -> apply -> load order."""

import pytest
import torch
from safetensors.torch import save_file

from src.models import backbone as backbone_mod
from src.models.backbone import BackboneError, build_model, create_backbone
from src.models.weights import WeightsError

TINY = {
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "checkpoint": None,
    "num_classes": 10,
    "img_size": 16,
    "in_chans": 1,
    "drop_path_rate": 0.0,
    "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
}


def tiny(**over):
    cfg = {**TINY, **over}
    return cfg


def test_builds_the_configured_timm_vit():
    m = create_backbone(tiny())
    assert m.patch_embed.num_patches == 16 and len(m.blocks) == 2 and m.embed_dim == 32
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_image_size_must_be_divisible_by_patch():
    with pytest.raises(BackboneError, match="img_size=18 is not divisible by the patch size"):
        create_backbone(tiny(img_size=18))


@pytest.mark.parametrize("kind", ["deit", "plain", "safetensors", "lightning"])
def test_checkpoint_kinds_load_exactly(tmp_path, kind):
    src = create_backbone(tiny())
    sd = src.state_dict()
    if kind == "deit":
        path = tmp_path / "w.pth"
        torch.save({"model": sd, "epoch": 3}, path)
    elif kind == "plain":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    elif kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # this project's Lightning checkpoints: student.* kept, teacher.* never stored
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": {f"student.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    m = create_backbone(tiny(checkpoint=str(path)))
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    other = create_backbone(tiny(kwargs={**TINY["kwargs"], "embed_dim": 48}))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="another architecture"):
        create_backbone(tiny(checkpoint=str(path)))


def test_head_for_other_classes_is_explained_or_dropped_when_asked(tmp_path):
    src = create_backbone(tiny(num_classes=7))
    path = tmp_path / "w7.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(BackboneError, match="7 classes.*num_classes=10.*drop_head=true"):
        create_backbone(tiny(checkpoint=str(path)))
    m = create_backbone(tiny(checkpoint=str(path), drop_head=True))
    assert m.head.weight.shape == (10, 32)
    assert torch.equal(m.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_missing_pretrained_weights_is_one_clear_paragraph(monkeypatch):
    real = backbone_mod.timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(backbone_mod.timm, "create_model", offline)
    with pytest.raises(BackboneError) as info:
        create_backbone(tiny(pretrained=True))
    msg = str(info.value)
    assert "\n" not in msg
    assert "Hugging Face cache" in msg and "model.checkpoint=PATH" in msg and "vit_tiny_patch16_224" in msg


def test_unknown_timm_kwargs_are_a_config_error():
    with pytest.raises(BackboneError, match="timm cannot build"):
        create_backbone(tiny(kwargs={**TINY["kwargs"], "num_heads": 5}))


def test_build_model_applies_the_method_before_loading(tmp_path):
    """A checkpoint with a method's modules loads only into the patched model: build_model applies
    the method first, create_backbone (the bare model) says to apply it."""
    src, params = build_model(tiny(), "dynamicvit", {"keep_rate": 0.5, "locations": [1]})
    assert params == {"keep_rate": 0.5, "locations": [1]} and src.reduction.name == "dynamicvit"
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in src.state_dict().items()}, "epoch": 0}, path)
    m, _ = build_model(tiny(checkpoint=str(path)), "dynamicvit", {"keep_rate": 0.5, "locations": [1]})
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(WeightsError, match="apply the method first"):
        create_backbone(tiny(checkpoint=str(path)))


def test_build_model_schedule_and_head_fitting_with_a_method(tmp_path):
    m, params = build_model(tiny(), "tome", {"prop_attn": True}, {"name": "constant", "r": 2})
    assert params["r"] == [2, 2] and m.reduction.name == "tome"
    src = create_backbone(tiny(num_classes=7))
    path = tmp_path / "w7.pth"
    torch.save({"model": src.state_dict()}, path)
    with pytest.raises(BackboneError, match="7 classes.*drop_head=true"):
        build_model(tiny(checkpoint=str(path)), "evit", {"keep_rate": 0.5, "locations": [1]})
    m, _ = build_model(tiny(checkpoint=str(path), drop_head=True), "evit", {"keep_rate": 0.5, "locations": [1]})
    assert m.head.weight.shape == (10, 32) and torch.equal(m.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_build_model_reads_nothing_it_does_not_need(monkeypatch, tmp_path):
    """A checkpoint wins over timm's pretrained path (no download); weights=False (config checks)
    neither downloads nor reads the checkpoint."""
    calls = []
    real = backbone_mod.timm.create_model

    def offline(name, pretrained=False, **kw):
        calls.append(pretrained)
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(backbone_mod.timm, "create_model", offline)
    path = tmp_path / "w.pth"
    torch.save(create_backbone(tiny()).state_dict(), path)
    build_model(tiny(pretrained=True, checkpoint=str(path)), "tome", {"r": 1})
    build_model(tiny(pretrained=True, checkpoint=str(tmp_path / "absent.pth")), "tome", {"r": 1}, weights=False)
    assert not any(calls)
    with pytest.raises(BackboneError, match="Hugging Face cache"):
        build_model(tiny(pretrained=True), "tome", {"r": 1})
