"""DynamicViT: learned token sparsification (Rao et al., NeurIPS 2021), as raoyongming/DynamicViT
(`models/dyvit.py` / `vit.py`, `losses.py`; HEAD 1322e62, same method as the NeurIPS release c6ccb9e).

Before each block in `locations` a small prediction module scores the current patch tokens from
their own features and the mean feature of the tokens still kept; it outputs log-probabilities
(index 0 = keep, 1 = drop). The stage keep ratios compound: keep_rate ** (s + 1) of the initial patch
tokens at stage s (0.7, 0.49, 0.343).

Training (model.train()): a hard Gumbel-softmax sample (tau 1, straight-through) decides per token;
nothing is removed. The decision, multiplied into the previous one, becomes a key mask used by the
masked softmax of *every* block (before the first stage the mask is all ones, and the reference still
uses its eps-smoothed softmax there). A dropped token is invisible to every other query but still
sees itself. The decisions feed the keep-ratio loss, and the last one selects the tokens distilled
against the teacher. A masked token counts as removed for the source map (its row is zeroed), so a
dense map (``forward_tokens(x, dense=True)``) gives its patch the features it had when masked, as
inference does for a dropped token.

Inference (model.eval()): tokens are removed: the int(num_patches * ratio) patch tokens with the
highest keep score stay, CLS first, then in descending score order (197 -> 138 -> 97 -> 68 for DeiT
at 0.7). Attention is the plain (fused) softmax.

Deviations from the reference, all invisible where the reference's outputs are finite:
- when every patch token of an image has been dropped in training, the reference's masked mean in
  the next predictor is 0/0 = NaN (and the NaN spreads through the batch-mean losses); here that
  image's global feature is 0 instead. It happens often on small patch grids (the digits model has
  16 patches) and at low keep rates (plausibly behind the NaN losses at keep 0.3 reported in
  JoakimHaurum/TokenReduction issue #2);
- the reference hard-codes 196 initial patches; here the input's actual patch count is used;
- every prefix token (CLS, a distillation token, register tokens) is protected and never scored,
  where the reference knows only CLS. The head must read the class token (global_pool='token'),
  because in training the dropped tokens are still present and would enter an average pool.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .base import (
    NO_REQUEST,
    QUARTER_POINTS,
    AttentionRequest,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    parse_locations,
    register,
)

Tensor = torch.Tensor


class PredictorLG(nn.Module):
    """One stage's prediction module; the submodule layout gives the official checkpoint keys
    (in_conv.{0,1}, out_conv.{0,2,4})."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2),
            nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4),
            nn.GELU(),
            nn.Linear(embed_dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        for m in self.modules():  # the reference model's own init
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, prev: Optional[Tensor] = None) -> Tensor:
        """x: (B, M, C) patch tokens, prev: (B, M, 1) previous keep decisions, or None when every token
        is kept (the inference path, where dropped tokens are gone) -> (B, M, 2) log-probs."""
        x = self.in_conv(x)
        B, M, C = x.shape
        local = x[..., : C // 2]
        if prev is None:  # all kept: the same sum over all tokens divided by the same count, M
            glob = x[..., C // 2 :].sum(dim=1, keepdim=True) / float(M)
        else:
            # mean of the global half over the tokens still kept. The decisions are hard 0/1, so the count
            # is 0 or >= 1: the guard only changes the reference's 0/0 = NaN for an image whose tokens were
            # all dropped (likely with few patches or low keep rates) into a zero global feature.
            count = prev.sum(dim=1, keepdim=True).clamp_min(1e-6)
            glob = (x[..., C // 2 :] * prev).sum(dim=1, keepdim=True) / count
        return self.out_conv(torch.cat([local, glob.expand(B, M, C // 2)], dim=-1))


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """The reference's masked softmax: logits (B, H, N, N), policy (B, N, 1) with 1 = kept.

    Dropped tokens are hidden as keys, except from themselves (diagonal); eps keeps rows finite.
    Computed in float32 (as the reference, for mixed precision) and cast back.
    """
    B, N, _ = policy.shape
    keys = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=keys.dtype, device=keys.device).view(1, 1, N, N)
    keys = keys + (1.0 - keys) * eye
    shifted = logits - logits.max(dim=-1, keepdim=True)[0]
    w = shifted.to(torch.float32).exp() * keys.to(torch.float32)
    w = (w + eps / N) / (w.sum(dim=-1, keepdim=True) + eps)
    return w.to(logits.dtype)


@register
class DynamicViT(ReductionMethod):
    name = "dynamicvit"
    #: dense map: a token dropped (eval) or masked (training) at a stage leaves its features there
    dense_restore = "source"
    module_names = ("score_predictor",)
    #: the trainer runs the unreduced teacher and passes teacher_logits / teacher_state to `losses`
    needs_teacher = True

    def __init__(
        self,
        model,
        keep_rate: float = 0.7,
        locations: Sequence[Union[int, float]] = QUARTER_POINTS,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        token_distill_weight: float = 0.5,
    ):
        self.depth = len(model.blocks)
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
            raise ReductionConfigError(f"dynamicvit keep_rate must be a number in (0, 1], got {keep_rate!r}")
        self.keep_rate = float(keep_rate)
        self.locations = self._check_locations(locations)
        for what, w in (
            ("ratio_weight", ratio_weight),
            ("distill_weight", distill_weight),
            ("token_distill_weight", token_distill_weight),
        ):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ReductionConfigError(f"dynamicvit {what} must be a number >= 0, got {w!r}")
        self.ratio_weight = float(ratio_weight)
        self.distill_weight = float(distill_weight)
        self.token_distill_weight = float(token_distill_weight)
        # stage s keeps keep_rate ** (s + 1) of the initial patch tokens (the reference's [r, r**2, r**3])
        self.ratios = [self.keep_rate ** (s + 1) for s in range(len(self.locations))]

        if model.cls_token is None or model.global_pool != "token":
            raise ReductionConfigError(
                "dynamicvit needs a model that classifies from its class token (cls_token present, "
                f"global_pool='token'); got global_pool={model.global_pool!r}, "
                f"class token {'present' if model.cls_token is not None else 'absent'}"
            )
        num_patches = model.patch_embed.num_patches
        self.counts(num_patches)  # raises if the last stage would keep no token
        self._attach_predictors(model)

    def _check_locations(self, locations: Any) -> List[int]:
        if isinstance(locations, (int, float)) or not isinstance(locations, Sequence) or len(locations) == 0:
            raise ReductionConfigError(
                f"dynamicvit locations must be a non-empty list of block indices, got {locations!r}"
            )
        locs = parse_locations(locations, self.depth, "dynamicvit")
        if any(b <= a for a, b in zip(locs, locs[1:])):
            raise ReductionConfigError(f"dynamicvit locations must be strictly increasing, got {locs}")
        return locs

    def counts(self, num_patches: int) -> List[int]:
        """Patch tokens kept at each stage in the inference path: int(num_patches * ratio)."""
        out = [int(num_patches * r) for r in self.ratios]
        if out[-1] < 1:
            raise ReductionConfigError(
                f"dynamicvit keep_rate={self.keep_rate} keeps int({num_patches} * {self.ratios[-1]:.4g}) = "
                f"{out[-1]} patch tokens at the last stage (block {self.locations[-1]}); raise keep_rate "
                f"to at least {(1.0 / num_patches) ** (1.0 / len(self.ratios)):.3f} or use fewer locations"
            )
        return out

    def _attach_predictors(self, model) -> None:
        """model.score_predictor = ModuleList of one predictor per stage (official key names).
        Predictors already attached with the same shape are kept (e.g. trained ones, when the
        method is re-applied with another keep rate)."""
        dim = model.embed_dim
        old = getattr(model, "score_predictor", None)
        if (
            isinstance(old, nn.ModuleList)
            and len(old) == len(self.locations)
            and all(isinstance(p, PredictorLG) and p.in_conv[1].in_features == dim for p in old)
        ):
            return
        ref = model.cls_token
        model.score_predictor = nn.ModuleList(PredictorLG(dim) for _ in self.locations).to(
            device=ref.device, dtype=ref.dtype
        )

    # --- forward hooks --------------------------------------------------------------------------
    def init_state(self, model, state: TokenState) -> TokenState:
        B, N, _ = state.x.shape
        num_patches = N - state.num_protected
        state.extras["dynamicvit"] = {
            "predictors": model.score_predictor,
            "num_patches": num_patches,
            "counts": self.counts(num_patches),
            # previous keep decisions of the patch tokens (all kept at the start)
            "prev": state.x.new_ones(B, num_patches, 1),
            # training: key mask over all tokens, prefix tokens always 1
            "policy": state.x.new_ones(B, N, 1) if state.training else None,
            "decisions": [],  # training: hard decisions (B, num_patches) per stage, for the ratio loss
            "kept": [],  # fraction of patch tokens kept per stage
        }
        return state

    def before_block(self, i: int, block, state: TokenState) -> TokenState:
        if i not in self.locations:
            return state
        ex = state.extras["dynamicvit"]
        s = self.locations.index(i)
        p = state.num_protected
        # in inference the previous decisions are all ones (dropped tokens are removed, not masked)
        log_probs = ex["predictors"][s](state.x[:, p:], ex["prev"] if state.training else None)
        if state.training:
            # hard sample with straight-through gradients; a token dropped earlier stays dropped
            hard = F.gumbel_softmax(log_probs, hard=True)[:, :, 0:1] * ex["prev"]
            ex["decisions"].append(hard.reshape(hard.shape[0], -1))
            ex["policy"] = torch.cat([hard.new_ones(hard.shape[0], p, 1), hard], dim=1)
            ex["prev"] = hard
            if state.source is not None:
                # a masked token stands for nothing any more, as a dropped one in eval: in a dense pass its
                # patch keeps the features it had at this stage (the hard values are 0/1 up to rounding)
                state.source = state.source * (ex["policy"].detach() > 0.5).to(state.source.dtype)
            ex["kept"].append(hard.detach().mean())
        else:
            k = ex["counts"][s]
            idx = torch.argsort(log_probs[:, :, 0], dim=1, descending=True)[:, :k]
            state.keep(idx)
            ex["prev"] = ex["prev"][:, :k]  # still all ones
            ex["kept"].append(k / ex["num_patches"])
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        if not state.training:
            return NO_REQUEST
        policy = state.extras["dynamicvit"]["policy"]
        return AttentionRequest(softmax=lambda logits: policy_softmax(logits, policy))

    # --- training -------------------------------------------------------------------------------
    def ratio_loss(self, decisions: Sequence[Tensor]) -> Tensor:
        """Sum over stages of the batch mean of (kept fraction of an image - stage target)^2."""
        loss = decisions[0].new_zeros(())
        for dec, target in zip(decisions, self.ratios):
            loss = loss + ((dec.mean(dim=1) - target) ** 2).mean()
        return loss

    def losses(
        self,
        state: TokenState,
        *,
        logits: Optional[Tensor] = None,
        teacher_logits: Optional[Tensor] = None,
        teacher_state: Optional[TokenState] = None,
        **context: Any,
    ) -> Dict[str, Tensor]:
        """Weighted keep-ratio, logit-KL and kept-token MSE terms (DistillDiffPruningLoss, DeiT setting).
        Only the training path has decisions; an eval-mode state gives no terms."""
        ex = state.extras.get("dynamicvit")
        if ex is None or not state.training:
            return {}
        if logits is None or teacher_logits is None or teacher_state is None:
            raise ValueError(
                "dynamicvit losses need logits, teacher_logits and teacher_state (the unreduced teacher's "
                "final state); the trainer provides them when method.needs_teacher is True"
            )
        out = {"ratio": self.ratio_weight * self.ratio_loss(ex["decisions"]) / len(self.locations)}
        # KL(teacher || student) of the class distributions, T = 1, batch mean
        out["cls_distill"] = self.distill_weight * F.kl_div(
            F.log_softmax(logits, dim=-1),
            F.log_softmax(teacher_logits, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        # MSE of the finally kept patch tokens against the teacher's tokens at the same positions
        p = state.num_protected
        tokens, teacher_tokens = state.x[:, p:], teacher_state.x[:, teacher_state.num_protected :]
        if tokens.shape != teacher_tokens.shape:
            raise ValueError(
                f"dynamicvit token distillation needs the teacher's tokens in the student's layout: student "
                f"{tuple(tokens.shape)} vs teacher {tuple(teacher_tokens.shape)} (is the teacher unreduced?)"
            )
        # mean over the kept tokens' channels (0 when none is kept), written without a boolean index or a
        # host-side test, so a training step never waits for the device here
        keep = (ex["prev"].detach() > 0.5).to(tokens.dtype)  # (B, M, 1)
        squares = ((tokens - teacher_tokens) ** 2 * keep).sum()
        token = squares / (keep.sum() * tokens.shape[-1]).clamp_min(1.0)
        out["token_distill"] = self.token_distill_weight * token
        return out

    def new_module_names(self) -> List[str]:
        return ["score_predictor"]

    def metrics(self, state: TokenState) -> Dict[str, float]:
        """Mean fraction of the initial patch tokens kept at each stage, next to its target."""
        ex = state.extras.get("dynamicvit")
        if ex is None:
            return {}
        out = {f"keep_ratio_stage{s}": float(v) for s, v in enumerate(ex["kept"])}
        out.update({f"keep_ratio_target_stage{s}": t for s, t in enumerate(self.ratios[: len(ex["kept"])])})
        return out

    def extra_repr(self) -> str:
        return (
            f"keep_rate={self.keep_rate}, locations={self.locations}, ratio_weight={self.ratio_weight}, "
            f"distill_weight={self.distill_weight}, token_distill_weight={self.token_distill_weight}"
        )
