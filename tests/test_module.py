"""The LightningModule: frozen teacher, loss terms, parameter groups, lr scaling, checkpoints."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from src.models.backbone import build_model, create_backbone
from src.models.reduction import REGISTRY, ReductionConfigError, ReductionMethod, apply_reduction, register
from src.trainer.module import ReductionModule, distillation_loss, soft_targets

TINY = {
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "checkpoint": None,
    "num_classes": 10,
    "img_size": 16,
    "in_chans": 1,
    "drop_path_rate": 0.0,
    "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
}


def backbone(seed=0):
    torch.manual_seed(seed)
    return create_backbone(TINY)


def make(method="tome", params=None, seed=0, **kw):
    params = {"r": 2} if params is None and method == "tome" else (params or {})
    return ReductionModule(backbone(seed), method=method, method_params=params, num_classes=10, **kw)


def fake_trainer(module, world_size=1, accumulate=1, steps=100, epochs=10):
    module._trainer = SimpleNamespace(
        world_size=world_size, accumulate_grad_batches=accumulate, estimated_stepping_batches=steps, max_epochs=epochs
    )
    return module


def capture_logs(module):
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    return logged


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_teacher_is_frozen_unreduced_and_outside_the_optimizer():
    m = fake_trainer(make(distill={"type": "soft", "weight": 1.0}))
    assert m.student.reduction.name == "tome" and m.teacher.reduction.name == "none"
    assert all(not p.requires_grad for p in m.teacher.parameters())
    m.train()
    assert m.student.training and not m.teacher.training
    in_opt = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.student.parameters()}
    assert not in_opt & {id(p) for p in m.teacher.parameters()}


def test_teacher_starts_with_the_student_weights_and_r0_equals_plain_timm():
    plain = backbone().eval()
    m = make(params={"r": 0}).eval()
    x, _ = batch()
    with torch.no_grad():
        ref = plain(x)
        assert torch.allclose(m.student(x), ref, atol=1e-5)
        assert torch.allclose(m.teacher(x), ref, atol=1e-5)
    with torch.no_grad():  # r > 0 really changes the student
        assert not torch.allclose(make().eval().student(x), ref, atol=1e-4)


def test_checkpoints_hold_no_teacher_and_reload():
    m = make()
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    other = make(seed=5)
    teacher_before = copy.deepcopy(other.teacher.state_dict())
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"], strict=True)
    for k, v in m.student.state_dict().items():
        assert torch.equal(other.student.state_dict()[k], v)
    for k, v in teacher_before.items():  # the teacher is rebuilt from the config, not the checkpoint
        assert torch.equal(other.teacher.state_dict()[k], v)


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_training_loss_is_ce_plus_weighted_distillation(kind):
    m = make(distill={"type": kind, "weight": 0.5, "tau": 2.0}, mixup={"label_smoothing": 0.1})
    m._trainer = None
    logged = capture_logs(m)
    m.train()
    x, y = batch()
    loss = m.training_step((x, y), 0)
    with torch.no_grad():
        s = m.student.forward_head(m.student.forward_tokens(x).x)
        t = m.teacher(x)
    expected = SoftTargetCrossEntropy()(s, soft_targets(y, 10, 0.1))
    if kind != "none":
        expected = expected + 0.5 * distillation_loss(kind, s, t, 2.0)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert ("train/loss_distill" in logged) == (kind != "none") and "train/loss_ce" in logged
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in m.teacher.parameters())


def test_distillation_losses_follow_deit():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    tau = 3.0
    manual = (
        (F.softmax(t / tau, 1) * (F.log_softmax(t / tau, 1) - F.log_softmax(s / tau, 1))).sum() * tau**2 / s.numel()
    )
    assert torch.allclose(distillation_loss("soft", s, t, tau), manual, atol=1e-6)
    assert torch.allclose(distillation_loss("hard", s, t, tau), F.cross_entropy(s, t.argmax(1)))
    assert distillation_loss("soft", t, t, tau).abs() < 1e-6
    with pytest.raises(ReductionConfigError, match="distill.type"):
        make(distill={"type": "kl"})


@pytest.fixture
def aux_method():
    """A method with a new module, a weighted loss, a metric and needs_teacher, as DynamicViT will."""

    @register
    class AuxMethod(ReductionMethod):
        name = "test_aux"
        needs_teacher = True
        seen = {}

        def __init__(self, model, weight=2.0):
            self.depth = len(model.blocks)
            self.weight = weight
            model.aux_predictor = nn.Linear(model.embed_dim, 1)
            self.model = model

        def losses(self, state, **context):
            AuxMethod.seen.update(context)
            return {"aux": self.weight * self.model.aux_predictor(state.x[:, 0]).pow(2).mean()}

        def new_module_names(self):
            return ["aux_predictor"]

        def metrics(self, state):
            return {"tokens_out": float(state.x.shape[1])}

    yield AuxMethod
    REGISTRY.pop("test_aux", None)


def test_method_losses_metrics_teacher_and_parameter_groups(aux_method):
    m = make("test_aux", params={"weight": 3.0}, optim={"backbone_lr_scale": 0.1, "backbone_freeze_epochs": 1})
    m._trainer = None
    logged = capture_logs(m)
    m.train()
    x, y = batch()
    loss = m.training_step((x, y), 0)
    assert "train/loss_aux" in logged and logged["train/tokens_out"] == 17.0
    ctx = aux_method.seen
    assert ctx["teacher_logits"] is not None and ctx["teacher_state"] is not None  # needs_teacher, no distill
    assert ctx["targets"].shape == (4, 10) and ctx["epoch"] == 0 and ctx["step"] == 0
    aux = 3.0 * m.student.aux_predictor(m.student.forward_tokens(x).x[:, 0]).pow(2).mean()
    assert torch.allclose(loss - logged["train/loss_ce"], aux, atol=1e-5)

    groups = m.param_groups(weight_decay=0.05)
    new_ids = {id(p) for p in m.student.aux_predictor.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if g["group"] == "new":
            assert ids <= new_ids and g["lr_scale"] == 1.0
        else:
            assert not ids & new_ids and g["lr_scale"] == 0.0  # frozen in epoch 0
    assert m._lr_scale("backbone", epoch=1) == 0.1 and m._lr_scale("new", epoch=0) == 1.0


def test_weight_decay_skips_biases_norms_and_tokens():
    m = make()
    groups = m.param_groups(weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    named = dict(m.student.named_parameters())
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert id(named[name]) in no_decay, name
    for name in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert id(named[name]) not in no_decay, name


def test_learning_rate_scales_with_the_global_batch_and_follows_warmup_cosine():
    optim = {"lr": 1e-3, "lr_base_batch": 512, "warmup_epochs": 1, "warmup_lr": 1e-6, "min_lr": 1e-5}
    m = fake_trainer(make(optim=optim, batch_size=64), world_size=8, accumulate=2, steps=100, epochs=10)
    assert m.effective_lr() == pytest.approx(1e-3 * 8 * 64 * 2 / 512)
    one = fake_trainer(make(optim=optim, batch_size=64))
    assert one.effective_lr() == pytest.approx(1e-3 * 64 / 512)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = {}
    for step in (0, 5, 10, 55, 100):
        sched.step_update(num_updates=step)
        lrs[step] = opt.param_groups[0]["lr"]
    import math

    peak = m.effective_lr()
    cosine = lambda t: 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 100))  # noqa: E731
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + 5 * (peak - 1e-6) / 10)  # linear warmup towards the peak
    # timm's (and DeiT's) cosine runs over all steps, warmup included (warmup_prefix=False)
    assert lrs[10] == pytest.approx(cosine(10)) and lrs[55] == pytest.approx(cosine(55))
    assert lrs[100] == pytest.approx(1e-5)


def test_other_backbones_run_with_method_none_only():
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    m = ReductionModule(net, method="none", num_classes=10)
    m._trainer = None
    capture_logs(m)
    m.train()
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert net[1].weight.grad is not None
    with pytest.raises(ReductionConfigError, match="method=none"):
        ReductionModule(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), method="tome", method_params={"r": 1})


def test_frozen_params_stay_out_of_the_optimizer_and_unchanged():
    """optim.frozen_params (DynamicViT's optimizer skips cls_token and pos_embed): never trained."""
    m = fake_trainer(make(optim={"frozen_params": ["cls_token", "pos_embed", "blocks.0.norm1"], "lr": 1.0}))
    frozen = {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.norm1.bias"}
    named = dict(m.student.named_parameters())
    in_opt = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert {n for n, p in named.items() if id(p) not in in_opt} == frozen
    before = {n: named[n].detach().clone() for n in frozen}
    opt = m.configure_optimizers()["optimizer"]
    m.train()
    x, y = batch()
    F.cross_entropy(m.student(x), y).backward()
    opt.step()
    assert all(torch.equal(named[n], before[n]) for n in frozen)
    assert not torch.equal(named["blocks.1.norm1.weight"].detach(), torch.ones(32))  # the rest trains


def test_frozen_params_naming_nothing_is_a_config_error():
    with pytest.raises(ReductionConfigError, match="'pos_embd' names no parameter.*'pos_embed'"):
        make(optim={"frozen_params": ["pos_embd"]})


def test_bad_method_parameters_fail_at_construction():
    with pytest.raises(ReductionConfigError, match="r must be >= 0"):
        make(params={"r": -1})
    with pytest.raises(ReductionConfigError, match="removes"):
        make(params={"r": 9})  # 16 patch tokens, 2 blocks


def test_ema_follows_the_student_outside_the_optimizer():
    m = fake_trainer(make(ema={"enabled": True, "decay": 0.5}))
    m._trainer.global_step = 10
    ema_params = {id(p) for p in m.ema.parameters()}
    in_opt = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert not ema_params & in_opt and all(not p.requires_grad for p in m.ema.parameters())
    before = m.ema.module.head.weight.clone()

    def closure():  # stands for the training step: the student's weights move
        with torch.no_grad():
            m.student.head.weight.add_(1.0)

    # the EMA moves inside optimizer_step (so a step checkpoint written after it holds the update)
    m.optimizer_step(0, 0, torch.optim.SGD(m.student.parameters(), lr=0.0), closure)
    expected = 0.5 * before + 0.5 * m.student.head.weight
    assert torch.allclose(m.ema.module.head.weight, expected, atol=1e-6)
    assert m.ema.module.reduction.name == "tome"  # the EMA copy is reduced like the student


def test_an_already_reduced_student_is_taken_as_is_and_the_teacher_is_its_unreduced_copy():
    """build_model's student (method applied, weights loaded) goes in unchanged; the teacher has the
    student's backbone weights and none of the method's modules."""
    student, _ = build_model(TINY, "dynamicvit", {"keep_rate": 0.7, "locations": [1]})
    with torch.no_grad():
        student.score_predictor[0].out_conv[2].weight.add_(1.0)  # "trained" predictors
    predictor = student.score_predictor[0].out_conv[2].weight
    m = ReductionModule(student, num_classes=10)
    assert m.student is student and m.method == "dynamicvit"
    assert m.student.score_predictor[0].out_conv[2].weight is predictor  # not re-initialised
    assert m.teacher.reduction.name == "none" and not hasattr(m.teacher, "score_predictor")
    t_sd = m.teacher.state_dict()
    s_sd = {k: v for k, v in student.state_dict().items() if not k.startswith("score_predictor.")}
    assert set(t_sd) == set(s_sd) and all(torch.equal(t_sd[k], v) for k, v in s_sd.items())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.teacher.parameters(), student.parameters()))
    plain = ReductionModule(backbone(), num_classes=10)  # an unpatched ViT: method none
    assert plain.method == "none" and plain.student.reduction.name == "none"


def test_merged_tokens_pool_by_size_in_the_training_path():
    """run_model uses forward_head_state: with average pooling, a merged token counts as many patches."""
    torch.manual_seed(0)
    model = create_backbone({**TINY, "kwargs": {**TINY["kwargs"], "global_pool": "avg", "class_token": False}})
    m = ReductionModule(apply_reduction(model, "tome", r=3), num_classes=10).eval()
    x, _ = batch()
    with torch.no_grad():
        logits, state = m.run_model(m.student, x, m.tokens_api)
        assert state.size is not None and (state.size > 1).any()
        assert torch.allclose(logits, m.student.forward_head_state(state))
        assert torch.allclose(logits, m.student(x))
        assert not torch.allclose(logits, m.student.forward_head(state.x), atol=1e-6)


def test_ema_weights_are_saved_apart_with_plain_student_names_and_restored_on_resume():
    m = fake_trainer(make(ema={"enabled": True, "decay": 0.5}))
    with torch.no_grad():
        for p in m.ema.module.parameters():
            p.add_(1.0)  # the EMA differs from the student
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert not any(k.startswith(("ema.", "teacher.")) for k in ckpt["state_dict"])
    ema = ckpt["state_dict_ema"]
    assert set(ema) == set(m.student.state_dict())
    assert all(torch.equal(ema[k], v) for k, v in m.ema.module.state_dict().items())
    other = make(seed=5, ema={"enabled": True, "decay": 0.5})
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"], strict=True)  # Lightning's resume
    for k, v in m.ema.module.state_dict().items():
        assert torch.equal(other.ema.module.state_dict()[k], v), k


def test_optimizer_and_schedule_are_timm_config_choices():
    """optim.name / optim.sched pick timm's optimizer and scheduler; the parameter groups, lr scaling
    and per-group lr_scale stay the project's."""
    optim = {
        "name": "sgd",
        "momentum": 0.8,
        "lr": 0.1,
        "sched": "constant",
        "warmup_epochs": 1,
        "backbone_lr_scale": 0.5,
    }
    m = fake_trainer(make(optim=optim, batch_size=64), steps=100, epochs=10)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.8
    assert "betas" not in opt.defaults  # AdamW's settings do not reach SGD
    sched.step_update(num_updates=50)  # after the 10 warmup steps: constant
    peak = 0.1 * 64 / 512
    assert {g["group"] for g in opt.param_groups} == {"backbone"}  # ToMe adds no modules
    assert all(g["lr"] == pytest.approx(peak * 0.5) for g in opt.param_groups)
    with pytest.raises(ReductionConfigError, match="optim.sched"):
        fake_trainer(make(optim={"sched": "linear"})).configure_optimizers()


def test_checkpoint_hyperparameters_say_what_the_student_is_and_load_weights_only(tmp_path):
    model_cfg = dict(TINY)
    m = ReductionModule(
        backbone(),
        method="tome",
        method_params={"r": 2},
        num_classes=10,
        model=model_cfg,
        method_config={"name": "tome", "params": {"r": 2}},
        optim={"lr": 1e-3},
    )
    hp = dict(m.hparams)
    assert "student" not in hp and hp["model"] == model_cfg and hp["method"] == "tome"
    assert hp["reduction"] == {"method": "tome", "settings": repr(m.student.reduction)}
    path = tmp_path / "hp.ckpt"
    torch.save({"hyper_parameters": hp}, path)
    assert torch.load(path, weights_only=True)["hyper_parameters"] == hp


def test_accuracies_are_metric_objects_logged_in_percent():
    m = make().eval()
    m._trainer = SimpleNamespace(sanity_checking=False)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    m.on_validation_epoch_start()
    x, y = batch(8)
    m.validation_step((x, y), 0)
    assert logged["val/top1"] is m.val_top1 and logged["val/teacher_top1"] is m.teacher_top1
    m.on_validation_epoch_end()
    with torch.no_grad():
        expected = 100.0 * (m.teacher(x).argmax(1) == y).float().mean().item()
    assert m.teacher_val_top1 == pytest.approx(expected)
    assert float(m.val_top1.compute()) == pytest.approx(100.0 * (m.student(x).argmax(1) == y).float().mean().item())
