"""The STViT-R detection backbone: pyramid shapes for several sizes, torchvision Faster R-CNN steps."""

import pytest
import timm
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from src.models import ReductionConfigError, apply_reduction
from src.models.detection import ViTDetBackbone


def _vit(method="stvit", **params):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=0,
        dynamic_img_size=True,
    )
    if method == "stvit":
        apply_reduction(vit, "stvit", block=1, pool_size=2, recover=True, **params)
    return vit


@pytest.mark.parametrize("method", ["stvit", "none"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128), (160, 96)])
def test_pyramid_levels_for_several_image_sizes(method, size):
    bb = ViTDetBackbone(_vit(method), out_channels=16, scale_factors=(2.0, 1.0, 0.5, 0.25)).eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 3, *size))
    assert list(out) == ["0", "1", "2", "3", "pool"] and bb.strides == [4, 8, 16, 32, 64]
    for name, stride in zip(out, bb.strides):
        assert out[name].shape == (2, 16, -(-size[0] // stride), -(-size[1] // stride)), name


def _detector(backbone):
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        backbone, num_classes=11, min_size=64, max_size=64, rpn_anchor_generator=anchors, box_detections_per_img=10
    )


def test_faster_rcnn_training_step_reaches_recovery_and_pyramid():
    bb = ViTDetBackbone(_vit(), out_channels=16, scale_factors=(2.0, 1.0, 0.5, 0.25))
    model = _detector(bb).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.tensor([[20.0, 10.0, 50.0, 44.0], [2.0, 2.0, 18.0, 20.0]]), "labels": torch.tensor([1, 7])},
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    vit = bb.vit
    assert vit.stvit_recover.q.weight.grad.abs().sum() > 0
    assert vit.stvit_centre.weight.grad.abs().sum() > 0
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert bb.levels[0][0].weight.grad.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        det = model([torch.rand(3, 64, 64)])
    assert set(det[0]) == {"boxes", "labels", "scores"}


def test_backbone_refuses_maps_it_cannot_build():
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=0,
    )
    apply_reduction(vit, "stvit", block=1, pool_size=2)
    with pytest.raises(ReductionConfigError, match="recover=True"):
        ViTDetBackbone(vit)
    bb = ViTDetBackbone(_vit(), out_channels=16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb(torch.randn(1, 3, 60, 64))


def test_new_module_names_resolve():
    bb = ViTDetBackbone(_vit(), out_channels=16)
    assert bb.new_module_names() == ["norm", "levels", "vit.stvit_centre", "vit.stvit_recover"]
    for name in bb.new_module_names():
        assert isinstance(bb.get_submodule(name), torch.nn.Module)
