import numpy as np
import pytest
from PIL import Image

from src.models import apply_reduction
from src.models.visualize import token_assignment, visualize_tokens


@pytest.mark.parametrize("method,params", [("tome", {"r": 13}), ("evit", {"keep_rate": 0.5}), ("gtp", {"r": 8})])
def test_visualisation_produces_an_image(deit_tiny, images, tmp_path, method, params):
    apply_reduction(deit_tiny, method, **params)
    path = tmp_path / f"{method}.png"
    picture = visualize_tokens(deit_tiny, images[0], path=str(path))
    assert path.is_file() and Image.open(path).size == (224 * 2 + 4, 224)
    assert np.asarray(picture).std() > 0
    assert deit_tiny.trace_source is False  # tracing was switched on only for the picture


def test_assignment_reflects_the_method(deit_tiny, images):
    apply_reduction(deit_tiny, "tome", r=13)
    assign, grid = token_assignment(deit_tiny, images[0])
    assert grid == (14, 14) and (assign >= 0).all()  # merging keeps every patch
    assert len(np.unique(assign)) == 41 - 1  # 40 patch tokens remain besides CLS
    apply_reduction(deit_tiny, "evit", keep_rate=0.5, fuse_token=False)
    assign, _ = token_assignment(deit_tiny, images[0])
    assert (assign < 0).sum() > 0  # dropped patches are shown as dropped
