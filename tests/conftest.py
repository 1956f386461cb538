import src  # noqa: F401  (first: sets OpenMP's wait policy before torch is imported)
import pytest
import timm
import torch


@pytest.fixture
def deit_tiny():
    """A randomly initialised DeiT-T (no download), deterministic."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 224, 224)
