"""Draw which patches each remaining token stands for, as a PNG.

    python visualize.py [image=PATH] [out=tokens.png] [Hydra overrides of the training config ...]

    python visualize.py model=deit_s model.checkpoint=deit_small.pth method=gtp image=cat.jpg out=gtp.png
    python visualize.py method=evit out=evit.png          # quickstart model, first validation digit

Without `image=`, the first validation image of the embedded digits is used. The model's weights
come from the model config (timm pretrained path or model.checkpoint; for the quickstart model pass
model.checkpoint=<a checkpoint of a train.py run>, otherwise its weights are random). The checkpoint is
loaded after the method is applied (build_model), so a run's own modules load with it, e.g.
`python visualize.py method=dynamicvit model.checkpoint=logs/train/runs/<run>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import sys

from src.bench import build_reduced, compose_config
from src.models.visualize import visualize_tokens
from src.trainer.config_check import check_values


def _image_tensor(cfg, path):
    if path is None:
        from src.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits, stratified_split

        x, y = load_digits()
        _, val = stratified_split(y, int(cfg.data.get("val_per_class", 100)), int(cfg.data.get("split_seed", 0)))
        img = (x[val[0]] - DIGITS_MEAN) / DIGITS_STD
        size = int(cfg.model.img_size)
        if img.shape[-1] != size:
            import torch.nn.functional as F

            img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        return img, (DIGITS_MEAN,), (DIGITS_STD,)
    from PIL import Image
    from timm.data import create_transform

    from src.data.digits import DIGITS_MEAN, DIGITS_STD
    from src.data.folder import model_preprocessing

    # the model's own evaluation preprocessing (its data_config, else timm's pretrained config)
    pre = model_preprocessing(cfg.model.name, cfg.model.get("data_config"))
    grey = int(cfg.model.in_chans) == 1  # the grey models here are the embedded digits' models
    mean, std = ((DIGITS_MEAN,), (DIGITS_STD,)) if grey else (pre["mean"], pre["std"])
    transform = create_transform(
        int(cfg.model.img_size),
        is_training=False,
        crop_pct=pre["crop_pct"],
        interpolation=pre["interpolation"],
        mean=mean,
        std=std,
    )
    img = transform(Image.open(path).convert("L" if grey else "RGB"))
    return img, mean, std


def main(argv):
    image = out = None
    overrides = []
    for arg in argv:
        if arg.startswith("image="):
            image = arg.split("=", 1)[1]
        elif arg.startswith("out="):
            out = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    try:
        cfg = compose_config(overrides)
        check_values(cfg, environment=False)
        model, _ = build_reduced(cfg, pretrained=True)
    except Exception as err:  # bad overrides or values, missing weights, bad params: one clear message
        print(f"visualize.py: {err}", file=sys.stderr)
        return 2
    img, mean, std = _image_tensor(cfg, image)
    out = out or f"tokens_{cfg.method.name}.png"
    visualize_tokens(model, img, mean=mean, std=std, path=out)
    print(f"wrote {out} ({cfg.method.name}: {model.reduction!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
