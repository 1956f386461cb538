"""Every config value is checked before any work (src/trainer/config_check.py): a bad value of any
option ends in one line naming the key, the value and what is allowed, exit code 2, no stack trace,
nothing trained or written. Most values are checked in process on composed configs; a handful go
through the real train.py / eval.py processes."""

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from src.models.reduction import ReductionConfigError
from src.trainer.config_check import ConfigValueError, check_values

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PARSER = OverridesParser.create()


GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


@functools.lru_cache(maxsize=None)
def _base(selection: tuple):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(selection))


def composed(*overrides):
    """The train config for `overrides`: group choices composed by Hydra (cached), values applied with
    Hydra's own override parser and OmegaConf.update, as Hydra applies them (fast: ~300 cases)."""
    parsed = [PARSER.parse_override(o) for o in overrides]
    groups = tuple(o for o, p in zip(overrides, parsed) if p.key_or_group.split("/")[0] in GROUPS)
    cfg = copy.deepcopy(_base(groups))
    for p in parsed:
        if p.key_or_group.split("/")[0] in GROUPS:
            continue
        if not p.is_add():  # Hydra refuses to change a key that is not there
            parent, _, leaf = p.key_or_group.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            assert node is not None and leaf in node.keys(), (
                f"{p.key_or_group} is not in the config: use +{p.key_or_group}"
            )
        with open_dict(cfg):
            OmegaConf.update(cfg, p.key_or_group, p.value(), merge=True, force_add=p.is_add())
    return cfg


def error_of(*overrides, environment=True) -> str:
    cfg = composed(*overrides)
    with pytest.raises(ConfigValueError) as info:
        check_values(cfg, environment=environment)
    return str(info.value)


IMAGENET = ("model=deit_s", "data=imagenet")  # a valid ImageFolder setting to vary one value of
WANDB = ("logger=wandb",)

# (overrides, the key=value the one-line error starts with)
BAD = [
    # optim
    (["optim.lr=-1"], "optim.lr=-1"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.lr=abc"], "optim.lr=abc"),
    (["optim.lr=nan"], "optim.lr=nan"),
    (["optim.lr=true"], "optim.lr=true"),
    (["optim.lr_base_batch=0"], "optim.lr_base_batch=0"),
    (["optim.lr_base_batch=1.5"], "optim.lr_base_batch=1.5"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.min_lr=-1"], "optim.min_lr=-1"),
    (["optim.warmup_lr=-1e-6"], "optim.warmup_lr=-1e-06"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs=-1"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9,1.0]"),
    (["optim.eps=0"], "optim.eps=0"),
    (["optim.backbone_lr_scale=-1"], "optim.backbone_lr_scale=-1"),
    (["optim.backbone_freeze_epochs=-1"], "optim.backbone_freeze_epochs=-1"),
    (["optim.backbone_freeze_epochs=0.5"], "optim.backbone_freeze_epochs=0.5"),
    (["optim.frozen_params=[1]"], "optim.frozen_params=[1]"),
    (["+optim.lrr=1"], "optim.lrr=1"),
    (["optim.name=adamx"], "optim.name=adamx"),
    (["optim.sched=linear"], "optim.sched=linear"),
    (["optim=sgd", "+optim.betas=[0.9,0.99]"], "optim.betas=[0.9,0.99]"),  # SGD takes no betas
    (["+optim.momentum=0.9"], "optim.momentum=0.9"),  # AdamW takes no momentum
    (["optim=sgd", "optim.momentum=1.0"], "optim.momentum=1.0"),
    (["+optim.amsgradd=true"], "optim.amsgradd=true"),  # not an argument of AdamW
    # distill, ema
    (["distill.type=kl"], "distill.type=kl"),
    (["distill.weight=-1"], "distill.weight=-1"),
    (["distill.tau=0"], "distill.tau=0"),
    (["+distill.temperature=2"], "distill.temperature=2"),
    (["ema.enabled=yes"], "ema.enabled=yes"),
    (["ema.decay=1.0"], "ema.decay=1.0"),
    (["ema.decay=0"], "ema.decay=0"),
    # profile
    (["profile.enabled=1"], "profile.enabled=1"),
    (["profile.batch_size=0"], "profile.batch_size=0"),
    (["profile.device=gpu"], "profile.device=gpu"),
    (["profile.device=cuda:x"], "profile.device=cuda:x"),
    (["profile.rounds=0"], "profile.rounds=0"),
    (["profile.iters=0"], "profile.iters=0"),
    (["profile.warmup=-1"], "profile.warmup=-1"),
    # top level
    (["seed=-1"], "seed=-1"),
    (["seed=1.5"], "seed=1.5"),
    (["seed=abc"], "seed=abc"),
    (["seed=4294967296"], "seed=4294967296"),
    (["train=1"], "train=1"),
    (["train=maybe"], "train=maybe"),
    (["ckpt_path=5"], "ckpt_path=5"),
    (["ckpt_path=''"], "ckpt_path=''"),
    (["task_name=''"], "task_name=''"),
    (["tags=5"], "tags=5"),
    (["optimized_metric=5"], "optimized_metric=5"),
    (["optimized_metric=[student_val_top1]"], "optimized_metric=[student_val_top1]"),
    (["+seeed=1"], "seeed=1"),
    (["threads=0"], "threads=0"),
    (["threads=two"], "threads=two"),
    (["model.display_name=''"], "model.display_name=''"),
    # digits data
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.batch_size=-4"], "data.batch_size=-4"),
    (["data.batch_size=2.5"], "data.batch_size=2.5"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.val_per_class=0"], "data.val_per_class=0"),
    (["data.val_per_class=500"], "data.val_per_class=500"),
    (["data.val_per_class=abc"], "data.val_per_class=abc"),
    (["data.split_seed=-1"], "data.split_seed=-1"),
    (["data.max_shift=-1"], "data.max_shift=-1"),
    (["data.max_shift=28"], "data.max_shift=28"),
    (["data.img_size=0"], "data.img_size=0"),
    (["data.img_size=32"], "data.img_size=32"),  # differs from model.img_size
    (["data.in_chans=3"], "data.in_chans=3"),
    (["data.mixup.mixup_alpha=-1"], "data.mixup.mixup_alpha=-1"),
    (["data.mixup.cutmix_alpha=-0.5"], "data.mixup.cutmix_alpha=-0.5"),
    (["data.mixup.label_smoothing=1.0"], "data.mixup.label_smoothing=1.0"),
    (["+data.mixup.prob=1.5"], "data.mixup.prob=1.5"),
    (["+data.mixup.switch_prob=-0.1"], "data.mixup.switch_prob=-0.1"),
    (["+data.mixup.mode=row"], "data.mixup.mode=row"),
    (["+data.mixup.alpha=0.8"], "data.mixup.alpha=0.8"),
    (["data.mixup.mixup_alpha=0.8", "data.batch_size=33"], "data.batch_size=33"),
    (["+data.batchsize=8"], "data.batchsize=8"),
    # ImageFolder data
    ([*IMAGENET, "data.batch_size=0"], "data.batch_size=0"),
    ([*IMAGENET, "data.batch_size=63"], "data.batch_size=63"),  # mixup / cutmix on: even batches
    ([*IMAGENET, "data.root=''"], "data.root=''"),
    ([*IMAGENET, "data.val_dir=''"], "data.val_dir=''"),
    ([*IMAGENET, "data.crop_pct=0"], "data.crop_pct=0"),
    ([*IMAGENET, "data.crop_pct=1.5"], "data.crop_pct=1.5"),
    ([*IMAGENET, "data.interpolation=cubic"], "data.interpolation=cubic"),
    ([*IMAGENET, "data.auto_augment=rand-x9"], "data.auto_augment=rand-x9"),
    ([*IMAGENET, "data.auto_augment=randaug"], "data.auto_augment=randaug"),
    ([*IMAGENET, "data.color_jitter=-1"], "data.color_jitter=-1"),
    ([*IMAGENET, "data.color_jitter=[0.4,0.4]"], "data.color_jitter=[0.4,0.4]"),
    ([*IMAGENET, "data.re_prob=2"], "data.re_prob=2"),
    ([*IMAGENET, "data.re_mode=noise"], "data.re_mode=noise"),
    ([*IMAGENET, "data.re_count=0"], "data.re_count=0"),
    ([*IMAGENET, "data.mean=[0.5,0.5]"], "data.mean=[0.5,0.5]"),
    ([*IMAGENET, "data.std=[0.2,0,0.2]"], "data.std=[0.2,0,0.2]"),
    ([*IMAGENET, "data.num_workers=-2"], "data.num_workers=-2"),
    ([*IMAGENET, "data.num_classes=10"], "data.num_classes=10"),
    ([*IMAGENET, "data.mixup.mode=row"], "data.mixup.mode=row"),
    ([*IMAGENET, "data.mixup.cutmix_minmax=[0.5]"], "data.mixup.cutmix_minmax=[0.5]"),
    ([*IMAGENET, "data.mixup.prob=-1"], "data.mixup.prob=-1"),
    (["data=imagenet"], "data.num_classes=1000"),  # the quickstart model has 10 classes
    # trainer
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1"),
    (["trainer.min_epochs=10"], "trainer.min_epochs=10"),
    (["trainer.min_epochs=-1"], "trainer.min_epochs=-1"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0"),
    (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5"),
    (["trainer.limit_train_batches=-1"], "trainer.limit_train_batches=-1"),
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0"),
    (["trainer.limit_val_batches=0.0"], "trainer.limit_val_batches=0.0"),
    (["trainer.precision=17"], "trainer.precision=17"),
    (["trainer.precision=fp8"], "trainer.precision=fp8"),
    (["trainer.accelerator=quantum"], "trainer.accelerator=quantum"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.devices=-2"], "trainer.devices=-2"),
    (["trainer.devices=[0,0]"], "trainer.devices=[0,0]"),
    (["trainer.devices=two"], "trainer.devices=two"),
    (["trainer.accelerator=cpu", "trainer.devices=[0,1]"], "trainer.devices=[0,1]"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["trainer.gradient_clip_algorithm=max"], "trainer.gradient_clip_algorithm=max"),
    (["+trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    (["+trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps=-2"),
    (["trainer.deterministic=maybe"], "trainer.deterministic=maybe"),
    (["trainer.benchmark=2"], "trainer.benchmark=2"),
    (["trainer.enable_progress_bar=1"], "trainer.enable_progress_bar=1"),
    (["trainer=ddp", "trainer.strategy=ddpp"], "trainer.strategy=ddpp"),
    (["trainer=ddp", "trainer.sync_batchnorm=1"], "trainer.sync_batchnorm=1"),
    (["+trainer.max_steps=0"], "trainer.max_steps=0"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch=3"),
    (["+trainer.logger=false"], "trainer.logger=false"),
    # callbacks (callbacks=crash_safe by default)
    (["callbacks.step_checkpoint.every_n_train_steps=0"], "callbacks.step_checkpoint.every_n_train_steps=0"),
    (["callbacks.step_checkpoint.every_n_train_steps=-5"], "callbacks.step_checkpoint.every_n_train_steps=-5"),
    (["callbacks.step_checkpoint.every_n_train_steps=2.5"], "callbacks.step_checkpoint.every_n_train_steps=2.5"),
    (["callbacks.model_checkpoint.save_top_k=-2"], "callbacks.model_checkpoint.save_top_k=-2"),
    (["callbacks.model_checkpoint.mode=maximum"], "callbacks.model_checkpoint.mode=maximum"),
    (["callbacks.model_checkpoint.monitor=top1"], "callbacks.model_checkpoint.monitor=top1"),
    (
        ["callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=3"],
        "callbacks.model_checkpoint.save_top_k=3",
    ),
    (["callbacks.model_checkpoint.monitor=val/ema_top1"], "callbacks.model_checkpoint.monitor=val/ema_top1"),
    (["+callbacks.step_checkpoint.every_n_epochs=1"], "callbacks.step_checkpoint.every_n_train_steps=100"),
    (["callbacks.model_checkpoint.save_last=sometimes"], "callbacks.model_checkpoint.save_last=sometimes"),
    (["callbacks.lr_monitor.logging_interval=batch"], "callbacks.lr_monitor.logging_interval=batch"),
    (["+callbacks.model_checkpoint.foo=1"], "callbacks.model_checkpoint.foo=1"),
    (["+callbacks.extra=1"], "callbacks.extra=1"),
    (["+callbacks.extra._target_=no.such.Callback"], "callbacks.extra._target_=no.such.Callback"),
    # loggers
    ([*WANDB, "logger.token_images.every_n_epochs=0"], "logger.token_images.every_n_epochs=0"),
    ([*WANDB, "logger.token_images.num_images=0"], "logger.token_images.num_images=0"),
    ([*WANDB, "logger.token_images.enabled=on"], "logger.token_images.enabled=on"),
    ([*WANDB, "+logger.token_images.every=2"], "logger.token_images.every=2"),
    ([*WANDB, "logger.wandb.offline=maybe"], "logger.wandb.offline=maybe"),
    ([*WANDB, "logger.wandb.log_model=some"], "logger.wandb.log_model=some"),
    (["logger=tensorboard", "logger.tensorboard.log_graph=1"], "logger.tensorboard.log_graph=1"),
    (["+logger.csv.flush_logs_every_n_steps=0"], "logger.csv.flush_logs_every_n_steps=0"),
    (["+logger.csv.foo=1"], "logger.csv.foo=1"),
    (["+logger.foo=1"], "logger.foo=1"),
    # model
    (["model.img_size=0"], "model.img_size=0"),
    (["model.img_size=-28"], "model.img_size=-28"),
    (["model.img_size=28.0"], "model.img_size=28.0"),
    (["model.num_classes=0"], "model.num_classes=0"),
    (["model.num_classes=5"], "model.num_classes=5"),  # the digits have 10 classes
    (["model.in_chans=0"], "model.in_chans=0"),
    (["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0"),
    (["model.drop_path_rate=-0.1"], "model.drop_path_rate=-0.1"),
    (["model.drop_head=yes"], "model.drop_head=yes"),
    (["model.pretrained=1"], "model.pretrained=1"),
    (["model.checkpoint_ema=1"], "model.checkpoint_ema=1"),
    (["model.name=''"], "model.name=''"),
    (["model.checkpoint=''"], "model.checkpoint=''"),
    (["model.bootstrap.epochs=0"], "model.bootstrap.epochs=0"),
    (["model.bootstrap.lr=0"], "model.bootstrap.lr=0"),
    (["model.bootstrap.warmup_epochs=-1"], "model.bootstrap.warmup_epochs=-1"),
    (["model.bootstrap.limit_train_batches=0"], "model.bootstrap.limit_train_batches=0"),
    (["model.bootstrap.enabled=1"], "model.bootstrap.enabled=1"),
    (["+model.bootstrap.epoch=3"], "model.bootstrap.epoch=3"),
    (["+model.imgsize=32"], "model.imgsize=32"),
    (["model=deit_s", "model.bootstrap.enabled=true"], "model.bootstrap.enabled=true"),
    (["+method.foo=1"], "method.foo=1"),
    # schedule
    (["schedule=constant", "schedule.r=-1"], "schedule.r=-1"),
    (["schedule=constant", "schedule.r=1.5"], "schedule.r=1.5"),
    (["schedule=constant", "+schedule.inflect=1"], "schedule.inflect=1"),
    (["schedule=decreasing", "schedule.inflect=abc"], "schedule.inflect=abc"),
    (["schedule=list", "schedule.r=[]"], "schedule.r=[]"),
    (["schedule=list", "schedule.r=[2,-1,0,0]"], "schedule.r=[2,-1,0,0]"),
    (["method=evit", "schedule=staged", "schedule.keep_rate=0"], "schedule.keep_rate=0"),
    (["method=evit", "schedule=staged", "schedule.keep_rate=1.5"], "schedule.keep_rate=1.5"),
    (["method=evit", "schedule=staged", "schedule.locations=[-1]"], "schedule.locations=[-1]"),
    (["schedule=flops", "schedule.gmacs=0"], "schedule.gmacs=0"),
    (["schedule=flops", "schedule.gmacs=-1"], "schedule.gmacs=-1"),
    (["schedule=flops", "schedule.name=flop"], "schedule.name=flop"),
    # the sweep objective (hparams_search)
    (["hparams_search=gmacs_budget_optuna", "budget.penalty=-1"], "budget.penalty=-1"),
    (["hparams_search=gmacs_budget_optuna", "budget.teacher_ratio=0"], "budget.teacher_ratio=0"),
    (["hparams_search=gmacs_budget_optuna", "budget.teacher_ratio=1.5"], "budget.teacher_ratio=1.5"),
    (["hparams_search=gmacs_budget_optuna", "budget.teacher_ratio=null", "budget.gmacs=-1"], "budget.gmacs=-1"),
    (["hparams_search=gmacs_budget_optuna", "budget.gmacs=2.5"], "budget.gmacs=2.5"),  # both set
    (["hparams_search=gmacs_budget_optuna", "+budget.limit=2"], "budget.limit=2"),
    (
        ["hparams_search=accuracy_gmacs_optuna", "+budget.gmacs=2.5"],
        "optimized_metric=[student_val_top1,student_gmacs]",
    ),
]


@pytest.mark.parametrize("overrides,starts", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_line_naming_key_value_and_range(overrides, starts):
    message = error_of(*overrides, environment=False)
    assert "\n" not in message and message.startswith(starts + " "), message
    # what is allowed: a range, the choices or the known keys
    assert any(w in message for w in ("must", "known:", "needs", "both set", "cannot")), message


def test_error_is_a_user_error_of_run():
    from src.trainer.run import USER_ERRORS

    assert issubclass(ConfigValueError, ReductionConfigError) and issubclass(ConfigValueError, USER_ERRORS)


def test_messages_name_the_allowed_range_and_a_hint():
    assert error_of("optim.lr=-1") == (
        "optim.lr=-1 must be a number > 0 (the peak learning rate for "
        "optim.lr_base_batch images, scaled by the global batch)"
    )
    assert "did you mean optim.lr?" in error_of("+optim.lrr=1")
    assert "did you mean trainer.max_epochs?" in error_of("+trainer.max_epoch=3")
    assert "one of none, soft, hard" in error_of("distill.type=kl")
    assert "an integer between 1 and 499" in error_of("data.val_per_class=500")
    assert "(0.0, 1.0] (a fraction)" in error_of("trainer.limit_train_batches=1.5")
    assert "bf16-mixed" in error_of("trainer.precision=17")
    assert "must be even while mixup or cutmix is on" in error_of("data.mixup.mixup_alpha=0.8", "data.batch_size=33")
    assert "set one of them" in error_of("hparams_search=gmacs_budget_optuna", "budget.gmacs=2.5")


# --- no false alarms ---------------------------------------------------------------------------------
def _names(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GOOD_CONFIGS = (
    [[]]
    + [[f"experiment={e}"] for e in _names("experiment")]
    + [[f"method={m}"] for m in _names("method")]
    + [[f"model={m}", "method=none"] for m in _names("model")]
    + [["model=deit_s", f"method={m}"] for m in _names("method")]
    + [[f"schedule={s}"] for s in _names("schedule") if s != "staged"]
    + [["method=evit", "schedule=staged"]]
    + [["model=deit_s", f"data={d}"] for d in _names("data") if d != "digits"]
    + [[f"trainer={t}"] for t in _names("trainer")]
    + [[f"logger={lg}"] for lg in _names("logger")]
    + [["~logger"]]
    + [[f"callbacks={c}"] for c in _names("callbacks")]
    + [["~callbacks"]]
    + [[f"hparams_search={h}"] for h in _names("hparams_search")]
    + [[f"optim={o}"] for o in _names("optim")]
    + [[f"debug={d}"] for d in _names("debug")]
    + [["model=deit_s", f"debug={d}"] for d in _names("debug")]
    + [["train=false"]]
    + [["task=detection"], ["task=detection", "model=stvit_swin_t", "method=none", "data=coco", "data.root=/coco"]]
    + [["task=detection", f"method={m}"] for m in _names("method")]
)


@pytest.mark.parametrize("overrides", GOOD_CONFIGS, ids=[" ".join(o) or "defaults" for o in GOOD_CONFIGS])
def test_shipped_configs_pass(overrides):
    check_values(composed(*overrides), environment=False)


def test_eval_config_passes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        check_values(compose("eval"))


def test_default_config_passes_on_this_machine():
    check_values(composed(), environment=True)


EDGES = [
    ["trainer.limit_train_batches=1.0"],
    ["trainer.limit_train_batches=5"],
    ["trainer.limit_train_batches=0.25"],
    ["trainer.limit_val_batches=1"],
    ["model.bootstrap.limit_train_batches=3"],
    ["trainer.precision=bf16-mixed"],
    ["trainer.precision=16-mixed"],
    ["trainer.precision=32"],
    ["trainer.precision=bf16"],
    ["trainer.precision=64-true"],
    ["trainer.devices=auto"],
    ["trainer.devices=-1"],
    ["trainer.devices=2"],
    ["trainer.devices=[0,1]"],
    ["trainer.devices='0,1'"],
    ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    ["trainer=ddp", "trainer.strategy=ddp_find_unused_parameters_true"],
    ["trainer.num_nodes=4"],
    ["+trainer.val_check_interval=0.5"],
    ["+trainer.val_check_interval=10"],
    ["+trainer.max_steps=100"],
    ["trainer.gradient_clip_val=null"],
    ["trainer.gradient_clip_val=0"],
    ["trainer.max_epochs=1"],
    ["trainer.min_epochs=5"],
    ["trainer.num_sanity_val_steps=-1"],
    ["trainer.deterministic=warn"],
    ["seed=0"],
    ["seed=null"],
    ["seed=4294967295"],
    ["ckpt_path=last"],
    ["ckpt_path=/some/last.ckpt"],
    ["optim.warmup_epochs=0.5"],
    ["optim.lr=1"],
    ["optim.backbone_lr_scale=0"],
    ["optim.frozen_params=pos_embed"],
    ["optim.sched=constant"],
    ["optim.sched=tanh"],
    ["optim.name=lamb"],
    ["+optim.amsgrad=true"],
    ["optim=sgd", "+optim.nesterov=false"],
    ["optim=sgd", "optim.momentum=0"],
    ["optim=sgd", "optim.name=momentum"],
    ["threads=1"],
    ["threads=null"],
    ["profile.rounds=1", "profile.iters=1", "profile.warmup=0"],
    ["ema.enabled=true", "ema.decay=0.9999"],
    ["ema.enabled=true", "callbacks.model_checkpoint.monitor=val/ema_top1"],
    ["callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min"],
    ["callbacks.model_checkpoint.save_top_k=-1"],
    ["callbacks.step_checkpoint.every_n_train_steps=1"],
    ["profile.device=cpu"],
    ["profile.enabled=false"],
    ["profile.batch_size=1"],
    ["distill.type=none", "distill.weight=0"],
    ["distill.type=hard"],
    ["distill.tau=4"],
    ["data.mixup.mixup_alpha=0.8", "data.batch_size=32"],
    ["data.eval_batch_size=null"],
    ["data.max_shift=0"],
    ["data.val_per_class=499"],
    ["data.num_workers=2"],
    [*IMAGENET, "data.auto_augment=null"],
    [*IMAGENET, "data.auto_augment=augmix-m5-w4-d2"],
    [*IMAGENET, "data.auto_augment=original"],
    [*IMAGENET, "data.auto_augment=rand-m7-n3-mstd0.5"],
    [*IMAGENET, "data.color_jitter=[0.4,0.4,0.4]"],
    [*IMAGENET, "data.color_jitter=null"],
    [*IMAGENET, "data.crop_pct=1.0"],
    [*IMAGENET, "data.mixup.cutmix_minmax=[0.2,0.8]"],
    [*IMAGENET, "data.mixup.mixup_alpha=0", "data.mixup.cutmix_alpha=0", "data.batch_size=63"],
    ["model=deit_s", "data=folder", "data.root=/x"],
    ["model=deit_s", "model.img_size=384"],
    ["model=deit_s", "model.checkpoint=w.pth", "model.checkpoint_ema=true"],
    ["model.drop_path_rate=0.0"],
    [*WANDB, "logger.wandb.offline=true", "logger.token_images.enabled=false"],
    [*WANDB, "logger.wandb.log_model=all"],
    ["schedule=constant", "schedule.r=0"],
    ["schedule=decreasing", "schedule.inflect=0.5"],
    ["method=evit", "schedule=staged", "schedule.keep_rate=[0.7,0.5]", "schedule.locations=[1,2]"],
    ["method=evit", "schedule=staged", "schedule.locations=[0.25,0.5,0.75]"],
    ["hparams_search=gmacs_budget_optuna", "budget.teacher_ratio=null", "budget.gmacs=2.5"],
    ["tags=[a,b]"],
    ["tags=null"],
    ["optimized_metric=student_val_top1"],
]


@pytest.mark.parametrize("overrides", EDGES, ids=[" ".join(o) for o in EDGES])
def test_valid_edge_values_pass(overrides):
    check_values(composed(*overrides), environment=False)


# --- this machine ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize(
    "overrides,starts",
    [
        (["trainer=gpu"], "trainer.accelerator=gpu"),
        (["trainer.accelerator=cuda"], "trainer.accelerator=cuda"),
        (["profile.device=cuda"], "profile.device=cuda"),
        (["profile.device=cuda:1"], "profile.device=cuda:1"),
    ],
)
def test_missing_gpu_is_one_line(overrides, starts):
    message = error_of(*overrides)
    assert "\n" not in message and message.startswith(starts + " ") and "use" in message, message
    check_values(composed(*overrides), environment=False)  # the value itself is fine


# --- before any work, in process: run() stops at check_config --------------------------------------
def test_run_stops_before_any_work(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from src.trainer.run import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "optim.lr=-1"],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        del cfg.hydra
    with pytest.raises(ConfigValueError, match=r"^optim\.lr=-1 must be a number > 0"):
        run(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


# --- the real entry points ---------------------------------------------------------------------------
def entry_point(script: str, tmp: Path, *overrides: str):
    run_dir = tmp / "run"
    cmd = [
        sys.executable,
        str(ROOT / script),
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    return proc, run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,overrides,line",
    [
        ("train.py", ["optim.lr=-1"], "error: optim.lr=-1 must be a number > 0"),
        ("train.py", ["seed=-1"], "error: seed=-1 must be null or an integer between 0 and 4294967295"),
        ("train.py", ["+optim.lrr=1"], "error: optim.lrr=1 is not a setting of optim (did you mean optim.lr?)"),
        ("train.py", ["data.batch_size=0"], "error: data.batch_size=0 must be an integer >= 1"),
        ("eval.py", ["trainer.precision=17"], "error: trainer.precision=17 must be one of 32-true"),
        (
            "eval.py",
            ["callbacks.step_checkpoint.every_n_train_steps=0"],
            "error: callbacks.step_checkpoint.every_n_train_steps=0 must be an integer >= 1",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_entry_points_exit_2_with_one_line_and_write_nothing(tmp_path, script, overrides, line):
    proc, run_dir = entry_point(script, tmp_path, *overrides)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    # only Hydra's own files: no teacher, checkpoint, summary or logger output
    assert not (tmp_path / "cache").exists()
    written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert all(p.startswith(".hydra/") or p.endswith(".log") for p in written), written
