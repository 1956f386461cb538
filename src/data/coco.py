"""COCO-format detection and instance-segmentation data (``data=coco``; ``data=scenes`` writes its own set in
this format and reads it through the same module), shaped for torchvision's Mask R-CNN.

A dataset is an images folder and an instances json per split, relative to ``data.root`` (defaults: the COCO
2017 layout). A sample is ``(image, target)``: ``image`` a float (3, H, W) tensor in [0, 1] (grey images as
RGB); ``target`` a dict with ``boxes`` (K, 4) float32 xyxy in pixels of the resized image, ``labels`` (K,)
int64 in 1..num_classes (0 is the background; COCO category ids sorted by id map to 1, 2, ...), ``masks``
(K, H, W) uint8, ``iscrowd`` (K,) int64, ``image_id`` int and ``orig_size`` (2,) int64 (height, width of the
file, to map predictions back to the original pixels). Batches are ``(list of images, list of targets)``:
torchvision's ``GeneralizedRCNNTransform`` pads and batches the variable sizes itself.

As in torchvision's detection reference (references/detection/coco_utils.py): boxes are clamped to the image
and degenerate ones (zero width or height) dropped; crowd annotations are left out of training targets
(validation keeps them with ``iscrowd`` = 1: COCO evaluation ignores detections matched to them); training
images left without any annotation are dropped from the training set (logged with their count). Polygons,
uncompressed and compressed RLE masks are decoded with pycocotools.

Training augmentation, as the Swin / STViT-R Mask R-CNN recipe: the shorter side resized to a size drawn
from ``train_scales`` (the longer side capped at ``max_size``), then a horizontal flip with ``flip_prob``;
boxes and masks follow the image (torchvision ``tv_tensors`` through ``transforms.v2`` functional ops).
Validation resizes the shorter side to ``val_scale``. The draws of a training image come from its own seed
(seed, epoch, index) given by `resumable_loader`, so a run resumed mid-epoch sees the same scales and flips.

Bad input fails in `validate()` (run before any model is built) with one line naming the setting, its value
and the fix: a missing root, images folder or annotations json, an unreadable json or one without
images / annotations / categories, a split without images, image files that are missing or empty.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .folder import DataError, resumable_loader, validation_loader

log = logging.getLogger(__name__)

BACKGROUND = "__background__"


def collate_detection(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]) -> Tuple[list, list]:
    """(list of images, list of targets): detection images differ in size, the model batches them."""
    return [image for image, _ in batch], [target for _, target in batch]


def _read_json(path: Path, key: str, need: Sequence[str], value: Any = None) -> dict:
    """The parsed instances json at `path` (data.`key`=`value`), with the lists `need`; DataError otherwise."""
    setting = f"data.{key}={path if value is None else value}"
    if not path.is_file():
        raise DataError(
            f"{setting}: annotations file {path} not found; set data.{key} to the instances json "
            f"(a path relative to data.root)"
        )
    try:
        with open(path, "rb") as f:
            content = json.load(f)
    except (OSError, ValueError) as err:  # unreadable, not UTF-8 or not json
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{setting}: cannot read {path} as json ({first}); point data.{key} at a COCO instances json"
        ) from err
    missing = [k for k in need if not isinstance(content, dict) or not isinstance(content.get(k), list)]
    if missing:
        raise DataError(
            f"{setting}: {path} has no {' / '.join(repr(k) for k in missing)} list; a COCO instances json "
            f"has 'images', 'annotations' and 'categories'"
        )
    return content


def _sorted_categories(content: dict, path: Path, key: str) -> List[dict]:
    cats = content.get("categories") or []
    if not cats or any(not isinstance(c, dict) or "id" not in c for c in cats):
        raise DataError(
            f"data.{key}: {path} has no categories (or one without an 'id'); COCO lists them as "
            f'"categories": [{{"id": 1, "name": "person"}}, ...]'
        )
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise DataError(f"data.{key}: {path} lists a category id twice: {sorted(ids)}; category ids must be unique")
    return sorted(({"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats), key=lambda c: c["id"])


def read_categories(annotations_path: str | os.PathLike, key: str = "val_annotations", value: Any = None) -> List[dict]:
    """The categories of an instances json, sorted by id (`{"id", "name"}` each): what the model needs
    (num_classes) before any image is read. `key` (and its `value`) name the setting in error messages."""
    path = Path(annotations_path).expanduser()
    return _sorted_categories(_read_json(path, key, ("categories",), value), path, key)


def resized_size(height: int, width: int, shorter: int, max_size: Optional[int]) -> Tuple[int, int]:
    """(height, width) with the shorter side `shorter`, the longer side at most `max_size` (None: no cap)."""
    scale = shorter / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 mask of a COCO segmentation: polygons, uncompressed or compressed RLE."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if len(p) >= 6]  # pycocotools needs 3 points
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)  # uncompressed RLE (COCO's crowds)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
    else:
        return np.zeros((height, width), np.uint8)
    if [int(s) for s in rle["size"]] != [height, width]:
        raise DataError(f"an RLE mask of size {rle['size']} on an image of size {[height, width]} (height, width)")
    mask = coco_mask.decode(rle)
    return (mask.reshape(height, width, -1).max(axis=2) > 0).astype(np.uint8)


def _xyxy_clamped(bbox: Sequence[float], height: int, width: int) -> List[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    ]


def usable_annotations(annotations: Sequence[dict], image: dict, train: bool) -> List[dict]:
    """The annotations that become targets: boxes of positive size after clamping to the image, and in
    training no crowd (torchvision's detection reference)."""
    out = []
    for a in annotations:
        if train and a.get("iscrowd", 0):
            continue
        bbox = a.get("bbox")
        if bbox is None or len(bbox) != 4:
            continue
        x0, y0, x1, y1 = _xyxy_clamped(bbox, image["height"], image["width"])
        if x1 > x0 and y1 > y0:
            out.append(a)
    return out


class CocoDetection(Dataset):
    """The images of one split with their usable annotations, resized (and in training flipped) with boxes
    and masks. Item `i` or `(i, seed)`: with a seed the random scale and flip come from that seed alone
    (the training loader's items), otherwise from torch's global RNG."""

    def __init__(
        self,
        images_dir: Path,
        images: List[dict],
        annotations: List[List[dict]],
        label_of_category: Dict[int, int],
        train: bool,
        scales: Sequence[int],
        max_size: Optional[int],
        flip_prob: float = 0.0,
    ):
        self.images_dir, self.images, self.annotations = Path(images_dir), images, annotations
        self.label_of_category = label_of_category
        self.train, self.scales, self.max_size = train, [int(s) for s in scales], max_size
        self.flip_prob = float(flip_prob) if train else 0.0

    def __len__(self) -> int:
        return len(self.images)

    def _load_image(self, record: dict) -> torch.Tensor:
        from PIL import Image

        path = self.images_dir / record["file_name"]
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        if rgb.shape[:2] != (record["height"], record["width"]):
            raise DataError(
                f"{path} is {rgb.shape[0]}x{rgb.shape[1]} pixels but its json record says "
                f"{record['height']}x{record['width']} (height x width); fix the annotations' image sizes"
            )
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)

    def target(self, index: int) -> Dict[str, Any]:
        """The unresized target of image `index` (boxes in the file's pixels)."""
        record, anns = self.images[index], self.annotations[index]
        h, w = record["height"], record["width"]
        boxes = torch.tensor([_xyxy_clamped(a["bbox"], h, w) for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = np.stack([decode_mask(a.get("segmentation"), h, w) for a in anns]) if anns else None
        return {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of_category[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks) if masks is not None else torch.zeros((0, h, w), dtype=torch.uint8),
            "iscrowd": torch.tensor([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=torch.int64),
            "image_id": int(record["id"]),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }

    def __getitem__(self, key):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        index, seed = key if isinstance(key, tuple) else (key, None)
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        shorter = self.scales[int(torch.randint(len(self.scales), (), generator=gen))] if self.train else self.scales[0]
        flip = self.train and float(torch.rand((), generator=gen)) < self.flip_prob

        target = self.target(index)
        h, w = target["orig_size"].tolist()
        image = tv_tensors.Image(self._load_image(self.images[index]))
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
        masks = tv_tensors.Mask(target["masks"])
        size = list(resized_size(h, w, shorter, self.max_size))
        if size != [h, w]:
            image, boxes = F.resize(image, size, antialias=True), F.resize(boxes, size)
            masks = F.resize(masks, size) if len(masks) else torch.zeros((0, *size), dtype=torch.uint8)
        if flip:
            image, boxes, masks = F.horizontal_flip(image), F.horizontal_flip(boxes), F.horizontal_flip(masks)
        target.update(boxes=boxes.as_subclass(torch.Tensor), masks=masks.as_subclass(torch.Tensor).contiguous())
        return F.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor).contiguous(), target


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


class CocoDetectionDataModule(L.LightningDataModule):
    """Any COCO-format instances dataset for Mask R-CNN (see the module docstring).

    `num_classes` (object categories, background excluded: a torchvision detector takes num_classes + 1),
    `category_names` (index = label, [0] the background) and `contiguous_to_category_id` ({label: COCO id})
    are read from the validation json's categories alone (`read_categories`), so the model can be built before
    `setup()` reads the images.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        batch_size: int = 2,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        train_scales: Sequence[int] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        val_scale: int = 800,
        max_size: Optional[int] = 1333,
        flip_prob: float = 0.5,
        **_ignored,
    ):
        super().__init__()
        self.root = root
        self.paths = {
            "train_images": train_images,
            "train_annotations": train_annotations,
            "val_images": val_images,
            "val_annotations": val_annotations,
        }
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_scales = [train_scales] if isinstance(train_scales, int) else list(train_scales or [])
        self.val_scale, self.max_size, self.flip_prob = val_scale, max_size, flip_prob
        self.train_set = self.val_set = None
        self.num_dropped_train_images = 0
        self._categories: Optional[List[dict]] = None
        self._splits: Dict[str, dict] = {}  # parsed and checked jsons, between validate() and setup()

    # --- the categories, known before setup ---------------------------------------------------------
    def categories(self) -> List[dict]:
        """The categories sorted by id (from the validation json; checked against the training one in setup)."""
        if self._categories is None:
            self._check_root()
            self._categories = read_categories(
                self._path("val_annotations"), "val_annotations", self.paths["val_annotations"]
            )
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self.categories())

    @property
    def category_names(self) -> List[str]:
        return [BACKGROUND] + [c["name"] for c in self.categories()]

    @property
    def contiguous_to_category_id(self) -> Dict[int, int]:
        return {label: c["id"] for label, c in enumerate(self.categories(), start=1)}

    @property
    def label_of_category(self) -> Dict[int, int]:
        return {c["id"]: label for label, c in enumerate(self.categories(), start=1)}

    # --- checks ---------------------------------------------------------------------------------------
    def check_settings(self) -> None:
        """The numeric settings (no file is read)."""
        for key in ("batch_size", "eval_batch_size", "val_scale"):
            if not _positive_int(getattr(self, key)):
                raise DataError(f"data.{key}={getattr(self, key)!r} must be a positive integer")
        if not self.train_scales or not all(_positive_int(s) for s in self.train_scales):
            raise DataError(
                f"data.train_scales={self.train_scales!r} must be a non-empty list of positive integers "
                f"(shorter-side sizes drawn at random in training), e.g. [480, 512, 544]"
            )
        if self.max_size is not None and not _positive_int(self.max_size):
            raise DataError(f"data.max_size={self.max_size!r} must be a positive integer or null (no cap)")
        if not isinstance(self.flip_prob, (int, float)) or not 0.0 <= float(self.flip_prob) <= 1.0:
            raise DataError(f"data.flip_prob={self.flip_prob!r} must be a probability in [0, 1]")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataError(f"data.num_workers={self.num_workers!r} must be 0 or a positive integer")

    def _check_root(self) -> Path:
        if self.root in (None, "", "???"):
            raise DataError(
                "data.root is not set: pass data.root=/path/to/coco, the folder holding the images folders and "
                "the annotations (data.train_images, data.val_images, data.*_annotations are relative to it)"
            )
        root = Path(str(self.root)).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root={self.root}: folder not found; set data.root=/path/to/coco")
        return root

    def _path(self, key: str) -> Path:
        return Path(str(self.root)).expanduser() / str(self.paths[key])

    def validate(self, need_train: bool = True) -> None:
        """Every check that does not decode an image, run before any model is built: the settings, the
        folders, the jsons and every referenced image file (exists, not empty)."""
        self.check_settings()
        self._check_root()
        for split in ("val", "train") if need_train else ("val",):  # val first: it defines the categories
            self._load_split(split)

    def _load_split(self, split: str) -> dict:
        """The parsed json of `split`, checked (cached until setup builds its dataset)."""
        if split in self._splits:
            return self._splits[split]
        root = self._check_root()
        images_key, ann_key = f"{split}_images", f"{split}_annotations"
        images_dir = self._path(images_key)
        if not images_dir.is_dir():
            raise DataError(
                f"data.{images_key}={self.paths[images_key]}: images folder {images_dir} not found; set "
                f"data.{images_key} to the folder of the {split} images, relative to data.root={root}"
            )
        ann_path = self._path(ann_key)
        content = _read_json(ann_path, ann_key, ("images", "annotations", "categories"), self.paths[ann_key])
        categories = _sorted_categories(content, ann_path, ann_key)
        if split == "val":
            self._categories = categories
        elif [c["id"] for c in categories] != [c["id"] for c in self.categories()]:
            raise DataError(
                f"data.{ann_key}: the training categories {[c['id'] for c in categories]} differ from the "
                f"validation ones {[c['id'] for c in self.categories()]} (data.val_annotations); use the jsons "
                f"of one dataset"
            )
        images = content["images"]
        if not images:
            raise DataError(
                f"data.{ann_key}={self.paths[ann_key]}: the {split} split has 0 images; point data.{ann_key} "
                f"at an instances json that lists the {split} images"
            )
        for record in images:
            if not isinstance(record, dict) or any(k not in record for k in ("id", "file_name", "height", "width")):
                raise DataError(
                    f"data.{ann_key}: an image record without id / file_name / height / width in {ann_path}: "
                    f"{str(record)[:120]}; every COCO image record has these four keys"
                )
        missing, empty = [], []
        for record in images:
            try:
                if os.stat(images_dir / record["file_name"]).st_size == 0:
                    empty.append(record["file_name"])
            except OSError:
                missing.append(record["file_name"])
        if missing:
            raise DataError(
                f"data.{images_key}={self.paths[images_key]}: {len(missing)} of {len(images)} images listed in "
                f"{ann_path.name} are missing from {images_dir} (e.g. {missing[0]}); point data.{images_key} at "
                f"the folder holding them or restore the files"
            )
        if empty:
            raise DataError(
                f"data.{images_key}={self.paths[images_key]}: {len(empty)} image files in {images_dir} are empty "
                f"(0 bytes, e.g. {empty[0]}); re-download or re-extract them"
            )
        known = {c["id"] for c in categories}
        unknown = {a.get("category_id") for a in content["annotations"]} - known
        if unknown:
            raise DataError(
                f"data.{ann_key}: annotations of category ids {sorted(unknown, key=str)[:5]} that {ann_path.name} "
                f"does not list under 'categories'; fix the json"
            )
        self._splits[split] = {"images_dir": images_dir, "images": images, "annotations": content["annotations"]}
        return self._splits[split]

    # --- datasets and loaders -------------------------------------------------------------------------
    def _dataset(self, split: str) -> CocoDetection:
        content = self._load_split(split)
        del self._splits[split]  # the dataset keeps what it needs; the raw json goes
        train = split == "train"
        by_image: Dict[Any, List[dict]] = {r["id"]: [] for r in content["images"]}
        for a in content["annotations"]:
            if a.get("image_id") in by_image:
                by_image[a["image_id"]].append(a)
        images, annotations, dropped_annotations = [], [], 0
        for record in content["images"]:
            usable = usable_annotations(by_image[record["id"]], record, train)
            dropped_annotations += len(by_image[record["id"]]) - len(usable)
            if train and not usable:
                continue
            images.append(record)
            annotations.append(usable)
        if train:
            self.num_dropped_train_images = len(content["images"]) - len(images)
            log.info(
                "data.train_annotations: %d of %d training images dropped (no annotation left after leaving out "
                "%d crowd or zero-size annotations), as torchvision's detection reference does",
                self.num_dropped_train_images,
                len(content["images"]),
                dropped_annotations,
            )
            if not images:
                raise DataError(
                    f"data.train_annotations={self.paths['train_annotations']}: none of the "
                    f"{len(content['images'])} training images has a non-crowd annotation with a box of positive "
                    f"size; check the json's annotations"
                )
        scales = self.train_scales if train else [self.val_scale]
        return CocoDetection(
            content["images_dir"],
            images,
            annotations,
            self.label_of_category,
            train=train,
            scales=scales,
            max_size=self.max_size,
            flip_prob=self.flip_prob,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        self.check_settings()
        if self.val_set is None:
            self.val_set = self._dataset("val")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train")

    def train_dataloader(self):
        """Resumable (`resumable_loader`): each image's scale and flip come from its own seed."""
        return resumable_loader(
            self.train_set,
            self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_detection,
        )

    def val_dataloader(self) -> DataLoader:
        return validation_loader(self.val_set, self.eval_batch_size, self.num_workers, collate_fn=collate_detection)


__all__ = [
    "BACKGROUND",
    "CocoDetection",
    "CocoDetectionDataModule",
    "collate_detection",
    "decode_mask",
    "read_categories",
    "resized_size",
    "usable_annotations",
]
