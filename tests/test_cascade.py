"""Cascade Mask R-CNN RoI heads (src/models/cascade.py) against mmdetection v2's CascadeRoIHead semantics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import clip_boxes_to_image, generalized_box_iou_loss

from src.models.cascade import STAGE_STDS, CascadeRoIHeads, cascade_roi_heads, decode, stage_coder
from src.models.detector import build_detector
from tests.test_detection_task import SMALL_VIT

C = 3  # object classes
CH = 8  # FPN channels


def _mmdet_delta2bbox(rois, deltas, stds):
    """mmdet's delta2bbox (means 0), written out here independently of torchvision's BoxCoder."""
    max_ratio = abs(math.log(16 / 1000))  # wh_ratio_clip
    d = deltas * torch.tensor(stds)
    dw, dh = d[:, 2].clamp(-max_ratio, max_ratio), d[:, 3].clamp(-max_ratio, max_ratio)
    px, py = (rois[:, 0] + rois[:, 2]) * 0.5, (rois[:, 1] + rois[:, 3]) * 0.5
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gx, gy, gw, gh = px + pw * d[:, 0], py + ph * d[:, 1], pw * dw.exp(), ph * dh.exp()
    return torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], 1)


def _features(batch=1, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {str(i): torch.randn(batch, CH, size // s, size // s, generator=g) for i, s in enumerate((4, 8, 16, 32))}


def _heads(**kw):
    torch.manual_seed(0)
    return cascade_roi_heads(C, channels=CH, box_head_dim=16, mask_head_dim=8, **kw)


class _ConstBox(nn.Module):
    """A box head with fixed outputs for every RoI: (cls logits, deltas)."""

    def __init__(self, cls, reg):
        super().__init__()
        self.c, self.r = torch.tensor(cls), torch.tensor(reg)

    def forward(self, x):
        return self.c.expand(len(x), -1), self.r.expand(len(x), -1)


class _ConstMask(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.v = torch.tensor(logits)[None, :, None, None]

    def forward(self, x):
        return self.v.expand(len(x), -1, 28, 28)


@pytest.mark.parametrize("stds", STAGE_STDS)
def test_coder_equals_mmdet_delta2bbox_and_round_trips(stds):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=g) * 100
    rois = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 80], 1)
    deltas = torch.randn(50, 4, generator=g) * 2
    deltas[:5, 2:] = -100.0  # far below mmdet's lower clamp of log(w): torchvision alone does not clamp there
    deltas[5:10, 2:] = 100.0
    coder = stage_coder(stds)
    assert torch.allclose(decode(coder, deltas, rois)[:, 0], _mmdet_delta2bbox(rois, deltas, stds), atol=1e-4)
    gt = rois + torch.randn(50, 4, generator=g)
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    enc = coder.encode_single(gt, rois)
    assert torch.allclose(
        enc[:, 0] * stds[0],
        ((gt[:, 0] + gt[:, 2]) - (rois[:, 0] + rois[:, 2])) / 2 / (rois[:, 2] - rois[:, 0]),
        atol=1e-5,
    )
    assert torch.allclose(decode(coder, enc, rois)[:, 0], gt, atol=1e-3)
    multi = decode(coder, torch.cat([deltas, -deltas], 1), rois)  # class-specific: one box per class slot
    assert multi.shape == (50, 2, 4) and torch.allclose(multi[:, 1], _mmdet_delta2bbox(rois, -deltas, stds), atol=1e-4)


def test_stage_thresholds_assign_positives_and_add_gt_boxes_first():
    heads = _heads(box_batch_size_per_image=64)
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    props = torch.tensor([[0, 0, 40, 40 * f] for f in (0.55, 0.65, 0.75, 0.2, 0.5)])  # IoU with gt = f
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    expected = {0: [2, 2, 2, 0, 2], 1: [0, 2, 2, 0, 0], 2: [0, 0, 2, 0, 0]}  # IoU >= thr: positive
    for stage, want in expected.items():
        rois, labels, matched, is_gt = heads.sample(stage, [props], targets)[0]
        assert len(rois) == 6 and torch.equal(rois[0], gt[0]) and is_gt.tolist() == [True] + [False] * 5
        got = {tuple(r.tolist()): int(lab) for r, lab in zip(rois[1:], labels[1:])}
        assert [got[tuple(p.tolist())] for p in props] == want, stage
        assert labels[0] == 2 and (labels > 0).sum() == 1 + sum(w > 0 for w in want)
        assert (labels[: int((labels > 0).sum())] > 0).all()  # positives first, as mmdet's sampling result
    rois, labels, _, is_gt = heads.sample(
        0, [props], [{"boxes": gt[:0], "labels": torch.tensor([], dtype=torch.long)}]
    )[0]
    assert len(rois) == 5 and (labels == 0).all() and not is_gt.any()  # no object: all background


def test_sampler_keeps_512_with_a_quarter_positives():
    heads = _heads()
    g = torch.Generator().manual_seed(0)
    gt = torch.tensor([[100.0, 100.0, 300.0, 300.0]])
    near = gt + torch.rand(400, 4, generator=g) * 10  # IoU > 0.9: positives
    far = torch.rand(800, 2, generator=g) * 50
    props = torch.cat([near, torch.cat([far, far + 20], 1)])
    rois, labels, _, _ = heads.sample(0, [props], [{"boxes": gt, "labels": torch.tensor([1])}])[0]
    assert len(rois) == 512 and int((labels > 0).sum()) == 128


def test_refinement_moves_sampled_rois_by_stage_deltas_and_drops_gt_boxes():
    heads = _heads(box_batch_size_per_image=64)
    slot0, slot1 = [0.1, -0.2, 0.3, 0.1], [-0.3, 0.2, -0.1, 0.2]  # deltas of class 1 and class 2 (3: zeros)
    for i in range(3):
        heads.box_heads[i] = _ConstBox([0.0, 0.0, 2.0, 1.0], slot0 + slot1 + [0.0] * 4)  # best object: class 2
    seen = []
    sample = heads.sample
    heads.sample = lambda stage, props, targets: (
        seen.append((stage, props, sample(stage, props, targets))) or seen[-1][2]
    )
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    props = [torch.tensor([[8.0, 8.0, 40.0, 38.0], [0.0, 30.0, 20.0, 63.0], [40.0, 40.0, 62.0, 62.0]])]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:40] = 1
    heads.train()
    result, losses = heads(_features(), props, [(64, 64)], [{"boxes": gt, "labels": torch.tensor([1]), "masks": masks}])
    assert result == []
    assert set(losses) == {f"loss_{k}_s{s}" for k in ("classifier", "box_reg", "mask") for s in range(3)}
    for stage in (0, 1):
        rois, labels, _, is_gt = seen[stage][2][0]
        deltas = torch.tensor([slot0 if lab == 1 else slot1 for lab in labels])  # positives: their gt class
        want = clip_boxes_to_image(_mmdet_delta2bbox(rois, deltas, STAGE_STDS[stage]), (64, 64))[~is_gt]
        got = seen[stage + 1][1][0]
        assert is_gt.sum() == 1 and len(got) == len(rois) - 1
        assert torch.allclose(got, want, atol=1e-4)
        # the losses of this stage: weight x (CE over all sampled RoIs, 10 x GIoU summed on positives / all)
        w = (1.0, 0.5)[stage]
        ce = F.cross_entropy(torch.tensor([0.0, 0.0, 2.0, 1.0]).expand(len(labels), -1), labels)
        assert torch.allclose(losses[f"loss_classifier_s{stage}"], w * ce)
        pos = labels > 0
        pred = _mmdet_delta2bbox(rois[pos], torch.tensor([slot0]).expand(int(pos.sum()), 4), STAGE_STDS[stage])
        giou = generalized_box_iou_loss(pred, gt.expand(len(pred), 4), reduction="sum")
        assert torch.allclose(losses[f"loss_box_reg_s{stage}"], w * 10 * giou / len(labels), atol=1e-5)


def test_test_scores_average_stage_logits_and_boxes_come_from_the_last_stage():
    heads = _heads(class_agnostic=True).eval()
    logits = [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [2.0, 0.0, 0.0, 1.0]]
    deltas = [[0.1, 0.0, 0.2, 0.0], [0.0, -0.1, 0.0, 0.3], [0.2, 0.1, -0.2, 0.1]]
    for i in range(3):
        heads.box_heads[i] = _ConstBox(logits[i], deltas[i])
    prop = torch.tensor([[10.0, 12.0, 40.0, 44.0]])
    out = heads(_features(), [prop], [(64, 64)])[0][0]
    # mmdet: softmax of the mean logits (BBoxHead.get_bboxes on the averaged cls_score)
    want = F.softmax(torch.tensor(logits).mean(0), 0)[1:]
    assert not torch.allclose(want, F.softmax(torch.tensor(logits), 1).mean(0)[1:], atol=1e-2)  # not mean of probs
    order = want.argsort(descending=True)
    assert torch.allclose(out["scores"], want[order]) and out["labels"].tolist() == (order + 1).tolist()
    box = prop
    for i in range(3):
        box = clip_boxes_to_image(_mmdet_delta2bbox(box, torch.tensor([deltas[i]]), STAGE_STDS[i]), (64, 64))
    assert torch.allclose(out["boxes"], box.expand(3, 4), atol=1e-4)


def test_test_masks_are_the_mean_of_the_stage_mask_probabilities():
    heads = _heads().eval()
    mask_logits = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [-1.0, 0.5, 2.0]]
    for i in range(3):
        heads.mask_heads[i] = _ConstMask(mask_logits[i])
    props = [torch.tensor([[10.0, 12.0, 40.0, 44.0], [2.0, 2.0, 30.0, 20.0]]), torch.zeros(0, 4)]
    out, losses = heads(_features(batch=2), props, [(64, 64), (64, 64)])
    assert losses == {} and len(out) == 2 and len(out[1]["boxes"]) == 0 and out[1]["masks"].shape == (0, 1, 28, 28)
    r = out[0]
    assert set(r) == {"boxes", "labels", "scores", "masks"} and len(r["labels"]) > 0
    assert r["masks"].shape == (len(r["labels"]), 1, 28, 28) and r["labels"].min() >= 1
    want = torch.sigmoid(torch.tensor(mask_logits)).mean(0)[r["labels"] - 1]
    assert torch.allclose(r["masks"][:, 0, 0, 0], want) and torch.allclose(r["masks"].amax((1, 2, 3)), want)
    assert r["scores"].min() > 0.05 and len(r["boxes"]) <= 100


def test_heads_layout():
    heads = cascade_roi_heads(80)
    assert isinstance(heads, CascadeRoIHeads) and len(heads.box_heads) == len(heads.mask_heads) == 3
    box = heads.box_heads[0]
    convs = [m for m in box.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in box.convs) == 4
    assert box.fc.in_features == 256 * 49 and box.fc.out_features == 1024
    assert box.cls.out_features == 81 and box.reg.out_features == 320  # reg_class_agnostic=False: 4 x 80
    assert cascade_roi_heads(80, class_agnostic=True).box_heads[1].reg.out_features == 4
    mask = heads.mask_heads[2]
    assert mask(torch.zeros(2, 256, 14, 14)).shape == (2, 80, 28, 28)
    assert heads.box_heads[0] is not heads.box_heads[1] and heads.mask_heads[0] is not heads.mask_heads[1]
    assert [m.high_threshold for m in heads.matchers] == [0.5, 0.6, 0.7] and heads.stage_weights == [1, 0.5, 0.25]


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster, and stays fast on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mask_rcnn_with_cascade_heads_trains_and_detects(one_thread):
    vit = dict(SMALL_VIT, kwargs=dict(SMALL_VIT["kwargs"], depth=2))
    torch.manual_seed(0)
    det, _ = build_detector(vit, "none", {}, None, num_classes=C, head=dict(fpn_channels=16), weights=False)
    det.roi_heads = cascade_roi_heads(C, channels=16, box_head_dim=32, mask_head_dim=8, box_batch_size_per_image=32)
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 12:44] = 1
    target = {"boxes": torch.tensor([[12.0, 8.0, 44.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": masks[:0]}
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    det.train()
    totals = []
    for _ in range(8):
        losses = det([image, torch.rand(3, 64, 64)], [target, empty])
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert {k for k in losses if k.endswith("_s2")} == {"loss_classifier_s2", "loss_box_reg_s2", "loss_mask_s2"}
    assert det.roi_heads.box_heads[2].fc.weight.grad.abs().sum() > 0
    assert det.roi_heads.mask_heads[1][0].weight.grad.abs().sum() > 0
    assert sum(totals[-2:]) / 2 < totals[0], totals
    det.eval()
    with torch.no_grad():
        out = det([image, torch.rand(3, 48, 64)])
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores", "masks"}
    assert out[1]["masks"].shape[1:] == (1, 48, 64) and out[0]["masks"].shape[0] == len(out[0]["boxes"]) > 0
