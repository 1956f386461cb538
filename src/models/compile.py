"""torch.compile for token-reduced models (and plain ones).

    from src.models.compile import compile_model
    compile_model(model)                 # in place; returns the model
    logits = model(images)               # the compiled graph (after the first call's compilation)
    state = model.forward_tokens(images) # the same graph: the path the trainer takes

A method with a static token schedule (``ReductionMethod.static_schedule``, all methods here) runs one
forward pass as one graph: `compile_model` then compiles with ``fullgraph=True``, so a graph break is
an error instead of a silent slowdown, and dynamo traces the whole loop over the blocks once (block
indices, per-block counts and keep rates are Python constants of the method), with no recompilation
across blocks or across batches of the same shape. A method whose token counts depend on the pixel
values (``static_schedule = False``) is compiled with ``fullgraph=False`` and the reason is logged.

For a reduced model the compiled function is its ``forward_tokens`` (kept on the model; ``forward``
calls it, so do the trainer and evaluation), not a wrapper module: parameter names and checkpoints are
unchanged, and a deep copy or pickle of the model (teacher, EMA, DDP spawn) is an uncompiled model.
A model without ``forward_tokens`` (a plain timm model, the unreduced teacher of another backbone) is
compiled in place with ``nn.Module.compile``.
"""

from __future__ import annotations

import itertools
import logging
import types
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch
import torch.nn as nn

from .reduction.base import COMPILED_TOKENS

log = logging.getLogger(__name__)


def static_schedule(model: nn.Module) -> bool:
    """True when every forward pass of one input shape is the same graph (no method, or a method with
    a static token schedule)."""
    method = getattr(model, "reduction", None)
    return method is None or bool(getattr(method, "static_schedule", True))


def compile_model(
    model: nn.Module,
    mode: Optional[str] = None,
    fullgraph: Optional[bool] = None,
    backend: Any = "inductor",
    dynamic: Optional[bool] = None,
    options: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Compile `model` in place with torch.compile and return it.

    fullgraph: None (default) picks True for a static token schedule and False otherwise (logged);
    True with a dynamic schedule is refused with the reason. mode / backend / dynamic / options are
    torch.compile's (e.g. mode="max-autotune", backend="aot_eager" for a quick check, dynamic=False to
    specialise on the batch size). Training and eval mode each get their own graph (one recompilation
    when the mode changes); a new batch size recompiles once, then (dynamic=None) the batch becomes a
    dynamic dimension."""
    static = static_schedule(model)
    method = getattr(model, "reduction", None)
    name = getattr(method, "name", "none")
    if fullgraph is None:
        fullgraph = static
        if not static:
            log.info(
                "compile_model: method '%s' has a data-dependent token schedule (static_schedule=False); "
                "compiling with fullgraph=False, graphs break where token counts depend on the image",
                name,
            )
    elif fullgraph and not static:
        raise ValueError(
            f"compile_model: method '{name}' keeps a number of tokens that depends on the image (static_schedule="
            "False), so its forward pass cannot be one graph; use fullgraph=False (or None to choose)"
        )
    kwargs = dict(fullgraph=fullgraph, backend=backend, dynamic=dynamic, mode=mode, options=options)
    if mode is not None and options is not None:
        raise ValueError("compile_model: give mode or options, not both (torch.compile's rule)")
    if hasattr(type(model), "_forward_tokens"):
        setattr(model, COMPILED_TOKENS, torch.compile(_own_code(type(model)._forward_tokens, model), **kwargs))
    else:
        model.compile(**kwargs)
    return model


_COUNT = itertools.count()


def _own_code(fn, model: nn.Module):
    """`fn` bound to `model`, through a copy of its code object. Dynamo keeps its compiled graphs (and
    its recompile limit, 8) per code object: every reduced model shares ``_forward_tokens``, so a
    process that compiles several models (a benchmark, a sweep) would fill one cache and hit the limit
    after eight of them. Each compiled model gets its own copy, so its graphs never evict another's."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_COUNT)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(own, model)


@contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` runs eagerly, compiled again after it: for what dynamo cannot trace,
    such as FLOP counting under a torch dispatch mode (src.models.profile.count_gmacs)."""
    held = {k: model.__dict__.pop(k) for k in (COMPILED_TOKENS, "_compiled_call_impl") if k in model.__dict__}
    try:
        yield model
    finally:
        model.__dict__.update(held)


def uncompile_model(model: nn.Module) -> nn.Module:
    """Undo `compile_model` (the model runs eagerly again)."""
    model.__dict__.pop(COMPILED_TOKENS, None)
    model.__dict__.pop("_compiled_call_impl", None)
    return model


def is_compiled(model: nn.Module) -> bool:
    return COMPILED_TOKENS in model.__dict__ or model.__dict__.get("_compiled_call_impl") is not None
