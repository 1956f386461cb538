"""Detection / instance-segmentation data: the COCO-format DataModule (a hand-written json with polygons,
compressed and uncompressed RLE, crowd and degenerate annotations) and the embedded digit scenes."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from src.data import CocoDetectionDataModule, DataError, ScenesDataModule, collate_detection, read_categories

H, W = 40, 60
CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}]  # unsorted ids


def _rle_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[20:36, 40:56] = 1
    m[20:24, 30:40] = 1  # an L shape
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with a run of zeros."""
    flat, counts, value, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": [int(c) for c in counts]}


def _box(mask: np.ndarray) -> list:
    return [float(v) for v in coco_mask.toBbox(coco_mask.encode(np.asfortranarray(mask)))]


def _write_coco(root, split: str = "train") -> None:
    """Five 40x60 images: 1 with a polygon, a compressed RLE and a box reaching past the border; 2 (grey)
    with a polygon and a crowd; 3 without annotations; 4 with a crowd only; 5 with a zero-width box only."""
    rng = np.random.default_rng(0)
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = []
    for i, name in enumerate(["a.png", "grey.png", "empty.png", "crowd_only.png", "degenerate.png"], start=1):
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if name == "grey.png" else pixels).save(root / split / name)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
    rle = coco_mask.encode(np.asfortranarray(_rle_mask()))
    crowd = np.zeros((H, W), np.uint8)
    crowd[2:12, 2:30] = 1
    ann = [
        (1, 7, [10, 5, 20, 20], [[10, 5, 30, 5, 30, 25, 10, 25]], 0),
        (1, 12, _box(_rle_mask()), {"size": [H, W], "counts": rle["counts"].decode()}, 0),
        (1, 3, [50, 30, 20, 20], [[50, 30, 59, 30, 59, 39, 50, 39]], 0),  # clamped to x <= 60, y <= 40
        (2, 3, [5, 20, 10, 10], [[5, 20, 15, 20, 15, 30, 5, 30]], 0),
        (2, 7, _box(crowd), _uncompressed_rle(crowd), 1),
        (4, 7, _box(crowd), _uncompressed_rle(crowd), 1),
        (5, 12, [5, 5, 0, 10], [[5, 5, 5, 5, 5, 15]], 0),
    ]
    annotations = [
        {"id": k, "image_id": i, "category_id": c, "bbox": b, "segmentation": s, "iscrowd": crowd_flag, "area": 1}
        for k, (i, c, b, s, crowd_flag) in enumerate(ann, start=1)
    ]
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"{split}.json").write_text(json.dumps(content))


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    _write_coco(root, "train")
    _write_coco(root, "val")
    return root


def _module(folder, **kw):
    settings = dict(
        root=str(folder),
        train_images="train",
        train_annotations="annotations/train.json",
        val_images="val",
        val_annotations="annotations/val.json",
        batch_size=2,
        num_workers=0,
        train_scales=[H],
        val_scale=H,
        max_size=None,
        flip_prob=0.0,
    )
    return CocoDetectionDataModule(**{**settings, **kw})


# --- the COCO module ---------------------------------------------------------------------------------
def test_categories_map_to_contiguous_labels_before_setup(coco_root):
    dm = _module(coco_root)
    assert dm.num_classes == 3 and dm.train_set is None  # known without reading an image
    assert dm.category_names == ["__background__", "dog", "cat", "bird"]  # sorted by id: 3, 7, 12
    assert dm.contiguous_to_category_id == {1: 3, 2: 7, 3: 12}
    assert [c["id"] for c in read_categories(coco_root / "annotations" / "val.json")] == [3, 7, 12]
    dm.setup("fit")
    image, target = dm.train_set[0]  # a.png: cat (7), bird (12), dog (3)
    assert target["labels"].tolist() == [2, 3, 1] and target["labels"].dtype == torch.int64


def test_sample_format_polygon_and_rle_masks_and_clamped_boxes(coco_root):
    dm = _module(coco_root)
    dm.setup("fit")
    image, target = dm.train_set[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    raw = np.asarray(Image.open(coco_root / "train" / "a.png"), dtype=np.float32) / 255
    assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1))
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [H, W]
    assert target["masks"].shape == (3, H, W) and target["masks"].dtype == torch.uint8
    assert target["boxes"].dtype == torch.float32 and target["iscrowd"].tolist() == [0, 0, 0]
    polygon = target["masks"][0].numpy()
    ys, xs = np.nonzero(polygon)
    assert abs(xs.min() - 10) <= 1 and abs(xs.max() - 29) <= 1 and abs(ys.min() - 5) <= 1 and abs(ys.max() - 24) <= 1
    assert np.array_equal(target["masks"][1].numpy(), _rle_mask())  # compressed RLE, exactly
    assert target["boxes"][0].tolist() == [10, 5, 30, 25]
    assert target["boxes"][2].tolist() == [50, 30, W, H]  # clamped to the image


def test_grey_image_becomes_rgb(coco_root):
    dm = _module(coco_root)
    dm.setup("fit")
    image, _ = dm.train_set[1]
    assert image.shape == (3, H, W) and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_training_drops_crowd_degenerate_and_empty_images_and_logs_it(coco_root, caplog):
    dm = _module(coco_root)
    with caplog.at_level(logging.INFO, logger="src.data.coco"):
        dm.setup("fit")
    assert [r["file_name"] for r in dm.train_set.images] == ["a.png", "grey.png"]
    assert dm.num_dropped_train_images == 3
    assert "3 of 5 training images dropped" in caplog.text and "3 crowd or zero-size annotations" in caplog.text
    _, grey = dm.train_set[1]
    assert grey["labels"].tolist() == [1] and grey["iscrowd"].tolist() == [0]  # its crowd left out
    # validation keeps every image and the crowds (flagged), but not the zero-width box
    assert len(dm.val_set) == 5
    _, grey_val = dm.val_set[1]
    assert grey_val["iscrowd"].tolist() == [0, 1]
    crowd = np.zeros((H, W), np.uint8)
    crowd[2:12, 2:30] = 1
    assert np.array_equal(grey_val["masks"][1].numpy(), crowd)  # uncompressed RLE
    _, degenerate = dm.val_set[4]
    assert degenerate["boxes"].shape == (0, 4) and degenerate["masks"].shape == (0, H, W)


def test_resize_scales_image_boxes_and_masks(coco_root):
    plain, double = _module(coco_root), _module(coco_root, train_scales=[2 * H], val_scale=2 * H)
    plain.setup("fit"), double.setup("fit")
    (im1, t1), (im2, t2) = plain.train_set[0], double.train_set[0]
    assert im1.shape == (3, H, W)
    assert im2.shape == (3, 2 * H, 2 * W) and t2["masks"].shape == (3, 2 * H, 2 * W)
    assert torch.equal(t2["boxes"], t1["boxes"] * 2)
    assert torch.equal(t2["masks"][:, ::2, ::2], t1["masks"]) and t2["masks"].sum() == 4 * t1["masks"].sum()
    assert t2["orig_size"].tolist() == [H, W]
    _, empty = double.val_set[2]  # no annotation: empty masks at the new size
    assert empty["masks"].shape == (0, 2 * H, 2 * W)
    capped = _module(coco_root, train_scales=[2 * H], max_size=90)  # 60 * 2 = 120 > 90: scale 1.5
    capped.setup("fit")
    im3, t3 = capped.train_set[0]
    assert im3.shape == (3, 60, 90) and torch.allclose(t3["boxes"], t1["boxes"] * 1.5)


def test_flip_mirrors_image_boxes_and_masks_together(coco_root):
    plain, flipped = _module(coco_root), _module(coco_root, flip_prob=1.0)
    plain.setup("fit"), flipped.setup("fit")
    (im1, t1), (im2, t2) = plain.train_set[(0, 5)], flipped.train_set[(0, 5)]
    assert torch.equal(im2, im1.flip(-1)) and torch.equal(t2["masks"], t1["masks"].flip(-1))
    x0, y0, x1, y1 = t1["boxes"].unbind(-1)
    assert torch.equal(t2["boxes"], torch.stack([W - x1, y0, W - x0, y1], -1))
    assert not torch.equal(t2["boxes"], t1["boxes"])
    _, val = flipped.val_set[0]  # validation never flips
    assert torch.equal(val["boxes"], t1["boxes"])


def test_random_scale_and_flip_come_from_the_item_seed(coco_root):
    dm = _module(coco_root, train_scales=[30, 40, 50, 60], flip_prob=0.5)
    dm.setup("fit")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = dm.train_set[(0, 11)], dm.train_set[(0, 11)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    drawn = {(dm.train_set[(0, s)][0].shape[-1], float(dm.train_set[(0, s)][1]["boxes"][0, 0])) for s in range(40)}
    widths = {w for w, _ in drawn}
    assert widths == {45, 60, 75, 90}  # every scale (shorter side 30..60 of a 40x60 image)
    assert len(drawn) > len(widths)  # and both flips


def test_collate_and_loaders_give_lists(coco_root):
    dm = _module(coco_root, eval_batch_size=3, train_scales=[30, 50])
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert [t["image_id"] for t in targets] == [1, 2, 3]
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == 2 and {t["image_id"] for t in targets} == {1, 2}
    pair = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 7), {"a": 2})]
    assert collate_detection(pair) == ([pair[0][0], pair[1][0]], [{"a": 1}, {"a": 2}])


# --- bad input: one line naming the setting, the value and the fix ----------------------------------
def _break(root, what):
    ann = root / "annotations" / "train.json"
    if what == "unreadable":
        ann.write_text("{not json")
    elif what in ("no_categories", "no_images", "not_a_dict"):
        content = json.loads(ann.read_text())
        if what == "no_categories":
            content.pop("categories")
        elif what == "no_images":
            content["images"], content["annotations"] = [], []
        else:
            content = [content]
        ann.write_text(json.dumps(content))
    elif what == "file_missing":
        (root / "train" / "grey.png").unlink()
    elif what == "file_empty":
        (root / "train" / "empty.png").write_bytes(b"")
    elif what == "unknown_category":
        content = json.loads(ann.read_text())
        content["annotations"][0]["category_id"] = 99
        ann.write_text(json.dumps(content))


BAD = [
    ("unreadable", {}, ["data.train_annotations", "cannot read", "point data.train_annotations"]),
    ("no_categories", {}, ["data.train_annotations", "'categories'", "a COCO instances json has"]),
    ("not_a_dict", {}, ["data.train_annotations", "'images'"]),
    ("no_images", {}, ["data.train_annotations=annotations/train.json", "0 images", "point data.train_annotations"]),
    ("file_missing", {}, ["data.train_images=train", "1 of 5 images", "grey.png", "point data.train_images"]),
    ("file_empty", {}, ["data.train_images=train", "empty (0 bytes", "empty.png", "re-download"]),
    ("unknown_category", {}, ["data.train_annotations", "[99]", "fix the json"]),
    (None, {"root": None}, ["data.root is not set", "data.root=/path/to/coco"]),
    (None, {"root": "???"}, ["data.root is not set", "data.root=/path/to/coco"]),
    (None, {"root": "/nonexistent/coco"}, ["data.root=/nonexistent/coco", "not found", "set data.root="]),
    (None, {"train_images": "images/train"}, ["data.train_images=images/train", "not found", "set data.train_images"]),
    (None, {"val_images": "nope"}, ["data.val_images=nope", "not found", "set data.val_images"]),
    (None, {"val_annotations": "x.json"}, ["data.val_annotations=x.json", "not found", "set data.val_annotations"]),
    (None, {"train_scales": []}, ["data.train_scales=[]", "non-empty list of positive integers"]),
    (None, {"flip_prob": 1.5}, ["data.flip_prob=1.5", "in [0, 1]"]),
    (None, {"max_size": 0}, ["data.max_size=0", "positive integer or null"]),
]


@pytest.mark.parametrize("damage, settings, expected", BAD, ids=[b[0] or next(iter(b[1])) for b in BAD])
def test_bad_input_fails_in_validate_with_the_key_and_the_fix(coco_root, damage, settings, expected):
    if damage:
        _break(coco_root, damage)
    dm = _module(coco_root, **settings)
    with pytest.raises(DataError) as err:
        dm.validate()
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_bad_training_data_is_not_checked_for_evaluation_only(coco_root):
    _break(coco_root, "file_missing")
    dm = _module(coco_root)
    dm.validate(need_train=False)  # eval.py: the training split is not needed
    dm.setup("validate")
    assert dm.train_set is None and len(dm.val_set) == 5


def test_setup_runs_the_same_checks(coco_root):
    _break(coco_root, "file_empty")
    with pytest.raises(DataError, match="data.train_images=train"):
        _module(coco_root).setup("fit")


def test_training_split_without_a_usable_annotation_fails(coco_root):
    ann = coco_root / "annotations" / "train.json"
    content = json.loads(ann.read_text())
    content["annotations"] = [a for a in content["annotations"] if a["iscrowd"]]
    ann.write_text(json.dumps(content))
    with pytest.raises(DataError, match="none of the 5 training images has a non-crowd annotation"):
        _module(coco_root).setup("fit")


# --- the embedded scenes -----------------------------------------------------------------------------
SMALL = dict(num_train=24, num_val=8, scene_size=64, max_digits=3, digit_sizes=[14, 28])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    dm = ScenesDataModule(cache_dir=str(tmp_path_factory.mktemp("scenes")), **SMALL)
    dm.prepare_data()
    return dm


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scenes_are_a_deterministic_coco_set(scenes, tmp_path):
    again = ScenesDataModule(cache_dir=str(tmp_path / "again"), **SMALL)
    again.prepare_data()
    first, second = _files(scenes.dataset_dir), _files(again.dataset_dir)
    assert len(first) == 24 + 8 + 2 and first == second  # same PNG bytes and json
    other = ScenesDataModule(cache_dir=str(tmp_path / "other"), **{**SMALL, "split_seed": 1})
    other.prepare_data()
    assert other.dataset_dir.name != again.dataset_dir.name
    assert _files(other.dataset_dir)["train/000000.png"] != first["train/000000.png"]
    assert [p.name for p in (tmp_path / "again").iterdir()] == [again.dataset_dir.name]  # no temporary left


def test_scene_digits_respect_the_digit_split(scenes):
    from src.data.digits import load_digits, stratified_split

    _, labels = load_digits()
    train_pool, val_pool = stratified_split(labels, 100, seed=0)
    used = {}
    for split in ("train", "val"):
        content = json.loads((scenes.dataset_dir / "annotations" / f"instances_{split}.json").read_text())
        used[split] = {a["digit_index"] for a in content["annotations"]}
        assert all(a["category_id"] == int(labels[a["digit_index"]]) + 1 for a in content["annotations"])
        per_image = np.bincount([a["image_id"] for a in content["annotations"]])[1:]
        assert len(per_image) == len(content["images"]) and 1 <= per_image.min() and per_image.max() <= 3
    assert used["train"] <= set(train_pool.tolist()) and used["val"] <= set(val_pool.tolist())
    assert used["train"].isdisjoint(used["val"])


def test_scene_boxes_are_tight_around_masks_and_apart(scenes):
    scenes.setup("fit")
    assert scenes.num_classes == 10 and scenes.category_names[1:] == [str(d) for d in range(10)]
    for dataset in (scenes.train_set, scenes.val_set):
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.shape == (3, 64, 64)
            for mask, box in zip(target["masks"], target["boxes"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert image[:, ys, xs].max(0).values.min() > 0.3  # the digit's pixels are bright
            b = target["boxes"]
            overlap_w = (
                torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0])
            ).clamp(0)
            overlap_h = (
                torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1])
            ).clamp(0)
            assert ((overlap_w * overlap_h).triu(1) == 0).all()
            assert set(target["labels"].tolist()) <= set(range(1, 11))


def test_scenes_know_their_classes_before_generating(tmp_path):
    dm = ScenesDataModule(cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.validate()
    assert dm.num_classes == 10 and dm.contiguous_to_category_id[1] == 1 and not (tmp_path / "cache").exists()


def test_scenes_reject_bad_settings(tmp_path):
    with pytest.raises(DataError, match=r"data.digit_sizes=\[20, 300\] .*data.scene_size=128"):
        ScenesDataModule(cache_dir=str(tmp_path), digit_sizes=[20, 300]).validate()
    with pytest.raises(DataError, match="data.num_train=0 must be a positive integer"):
        ScenesDataModule(cache_dir=str(tmp_path), num_train=0).validate()


def test_scenes_written_concurrently_keep_the_first_complete_set(tmp_path, monkeypatch):
    """Another process renames its set into place first: ours is discarded, no error, no temporary left."""
    import os
    import shutil

    import src.data.scenes as scenes_module

    real_rename = os.rename

    def rename_after_another_process(src, dst):
        shutil.copytree(src, dst)  # the other rank's identical set lands first
        real_rename(src, dst)  # then ours fails: the folder is not empty

    monkeypatch.setattr(scenes_module.os, "rename", rename_after_another_process)
    dm = ScenesDataModule(cache_dir=str(tmp_path), **{**SMALL, "num_train": 2, "num_val": 1})
    dm.setup("fit")
    assert [p.name for p in tmp_path.iterdir()] == [dm.dataset_dir.name] and len(dm.train_set) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_resumes_mid_epoch_with_the_same_scales_and_flips(scenes, workers, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything sets: the order's seed
    settings = dict(cache_dir=scenes.cache_dir, **SMALL, batch_size=2, train_scales=[48, 64, 80], flip_prob=0.5)

    def loader(num_workers):
        dm = ScenesDataModule(**settings, num_workers=num_workers)
        dm.setup("fit")
        return dm.train_dataloader()

    def take(it, n):
        return [next(it) for _ in range(n)]

    def same(a, b):
        def flat(batches):
            return [
                (image, t["boxes"], t["masks"], t["labels"], t["image_id"])
                for images, targets in batches
                for image, t in zip(images, targets)
            ]

        fa, fb = flat(a), flat(b)
        return len(fa) == len(fb) and all(
            all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(p, q)) for p, q in zip(fa, fb)
        )

    first = loader(workers)
    assert type(first).__name__ == "StatefulDataLoader"
    it = iter(first)
    head = take(it, 3)
    state = first.state_dict()
    rest = take(it, 4)
    del it
    assert len({img.shape[-1] for images, _ in head + rest for img in images}) > 1  # the scales vary

    torch.manual_seed(123)  # a resumed process draws other global random numbers before it resumes
    resumed = loader(workers)
    resumed.load_state_dict(state)
    assert same(take(iter(resumed), 4), rest)
    # each image's augmentation is its own: the same batches whatever loads them (workers or not)
    assert same(take(iter(loader(2 - workers)), 3), head)
