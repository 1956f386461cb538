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
    from src.trainer.config_check import check_values
    from src.trainer.distributed import is_global_zero
    from src.trainer.objective import check_objective, objective
    from src.trainer.run import USER_ERRORS, plain, run

    try:
        check_values(cfg)  # every config value (run() checks again: cheap), before the sweep objective's
        metric, budget = plain(cfg.get("optimized_metric")), plain(cfg.get("budget"))
        check_objective(metric, budget)
        summary = run(cfg)
        # hyper-parameter sweeps (hparams_search): summary.json key(s), optionally under a GMACs budget;
        # under DDP only the global rank 0 has the full summary
        return objective(summary, metric, budget) if is_global_zero() else None
    except USER_ERRORS as err:  # user errors: one clear message, no stack trace
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
