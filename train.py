"""Finetune (or, with train=false, evaluate) a token-reduced timm ViT.

    python train.py                                   # the quickstart on the embedded digits
    python train.py model=deit_s method=tome data=imagenet data.root=/path/to/imagenet
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from src.trainer.run import USER_ERRORS, run

    try:
        summary = run(cfg)
        # hyper-parameter sweeps (hparams_search) optimise one summary.json key
        return summary.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    except USER_ERRORS as err:  # user errors: one clear message, no stack trace
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
