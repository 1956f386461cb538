"""Evaluate a token-reduced timm ViT off-the-shelf (no training): `python eval.py model=deit_s method=tome`.
Same config tree as train.py, with train=false (conf/eval.yaml).

A checkpoint of a train.py run (or an official DeiT / EViT / DynamicViT file) is evaluated with the
method it was trained with: `python eval.py method=dynamicvit model.checkpoint=<run>/checkpoints/last.ckpt`
(`model.checkpoint_ema=true`: its EMA weights). The teacher is the checkpoint's backbone, unreduced."""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig):
    from src.trainer.run import USER_ERRORS, run

    try:
        summary = run(cfg)  # checks every config value first
        # hyper-parameter sweeps (hparams_search) optimise one summary.json key
        return summary.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    except USER_ERRORS as err:
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
