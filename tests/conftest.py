import pytest
import timm
import torch

import src  # noqa: F401  (first: sets OpenMP's wait policy before torch is imported)


@pytest.fixture
def deit_tiny():
    """A randomly initialised DeiT-T (no download), deterministic."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 224, 224)


@pytest.fixture(scope="session")
def scaleout_teacher_cache(tmp_path_factory):
    """The session's teacher cache of the scale-out runs (tests/scaleout.py TINY): the tiny quickstart
    teacher is trained by one plain run if no test did it yet. Returns (cache dir, teacher file)."""
    from hydra import compose, initialize_config_dir

    from src.trainer.run import teacher_cache_path
    from tests.scaleout import ROOT, TINY, cache_dir, train

    cache = cache_dir(tmp_path_factory)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        teacher = teacher_cache_path(compose("train", overrides=[*TINY, f"paths.cache_dir={cache}"]))
    if not teacher.is_file():
        train(tmp_path_factory.mktemp("warm") / "run", cache, "profile.enabled=false")
    assert teacher.is_file(), teacher
    return cache, teacher
