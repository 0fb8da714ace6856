"""Find the ops whose parameters ghost clipping handles, and tap their outputs, without hooks.

A `torch.overrides.TorchFunctionMode` sees every torch function a forward calls, with its
arguments. Nothing is registered on a module or a parameter: the mode is active only while
funcdp runs the user's loss, and it recognises a parameter by the identity of the tensor object
the loss receives in its `params` dict (`functional_call` hands exactly those objects to the
layers).

- The probe (`plan`) runs the loss on one example and records every use of every parameter.
  A parameter is handled by ghost clipping when its only use is the weight or bias slot of a
  supported op (`linear`, `conv1d/2d/3d`, `embedding`, `layer_norm`, `group_norm`, and
  `torch.addmm(bias, x, weight)`, HF's `Conv1D`), or when it is an embedding's weight tied to a
  linear output layer (`TIED`); any other use, or another second use, sends it to the vmap
  fallback, which is exact for it.
- The tapper (`Tapper`) runs inside `vmap(grad(...))`: it adds a zero-valued input `tap` to the
  output of each planned op (`y + tap`, so the gradient of the loss w.r.t. the tap is the op's
  output gradient B) and records the op's input A, which the train pass returns as auxiliary
  output.
- A linear, addmm or conv op over several positions whose weight goes to the vmap fallback is
  tapped too ("checked"): vmap's batched kernels can round its per-example gradient by the
  example's row, and its A and B bound how far (`funcdp.ghost.rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.func import vmap
from torch.overrides import TorchFunctionMode

LINEAR, CONV, EMBEDDING, LAYER_NORM, GROUP_NORM, ADDMM = (
    "linear",
    "conv",
    "embedding",
    "layer_norm",
    "group_norm",
    "addmm",
)

# Per op: (kind, argument names in order, defaults, slots of the weight and the bias).
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_SIGNATURES: dict[Callable[..., Any], tuple[str, tuple[str, ...], dict[str, Any]]] = {
    F.linear: (LINEAR, ("input", "weight", "bias"), {"bias": None}),
    F.conv1d: (CONV, _CONV_ARGS, _CONV_DEFAULTS),
    F.conv2d: (CONV, _CONV_ARGS, _CONV_DEFAULTS),
    F.conv3d: (CONV, _CONV_ARGS, _CONV_DEFAULTS),
    F.embedding: (
        EMBEDDING,
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False},
    ),
    F.layer_norm: (
        LAYER_NORM,
        ("input", "normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
    ),
    F.group_norm: (
        GROUP_NORM,
        ("input", "num_groups", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
    ),
    # torch.addmm(bias, x, weight) = bias + x @ weight: HF's Conv1D (GPT-2), weight [in, out].
    # Its slots are named for their roles; `_bind` renames torch's keywords.
    torch.addmm: (ADDMM, ("bias", "input", "weight"), {"beta": 1, "alpha": 1}),
}
_ADDMM_KEYWORDS = {"input": "bias", "mat1": "input", "mat2": "weight"}
# The ops whose weight's gradient is a product summed over positions: rounded by row in vmap.
PRODUCTS = (LINEAR, ADDMM, CONV)
_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

# Reading these does not use a parameter's value.
_HARMLESS = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "requires_grad",
        "is_leaf",
        "ndim",
        "layout",
        "is_cuda",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "is_nested",
        "size",
        "dim",
        "numel",
        "__len__",
        "is_floating_point",
        "is_complex",
    }
)


class OpSpec(NamedTuple):
    """One tapped op: its kind, the ghost parameters in its slots and what the rules need.

    Attributes:
      kind: "linear", "conv", "embedding", "layer_norm" or "group_norm".
      weight: name of the ghost parameter in the weight slot, or None.
      bias: name of the ghost parameter in the bias slot, or None.
      config: the op's other arguments (conv: nd, stride, padding, dilation, groups;
        embedding: padding_idx, num_embeddings; norms: normalized_shape or num_groups, eps).
      out_shape: the op's output shape for one example (the tap's shape).
      out_dtype: the output's dtype.
      checked: name of the fallback parameter in the weight slot of a linear, addmm or conv op
        whose rounding by row is checked (`funcdp.ghost.rows`), or None.
    """

    kind: str
    weight: str | None
    bias: str | None
    config: dict[str, Any]
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    checked: str | None = None


class Plan(NamedTuple):
    """The probe's result: the tapped ops in call order (ghost or checked, or both) and the
    parameters left to vmap.

    `uses` lists, per parameter, how the forward used it: "ghost <op>.<slot>" for a slot ghost
    clipping handles, "<op>.<slot>" for another slot of a known op, or the name of any other
    function that read it (`funcdp.explain` reports them).
    """

    ops: tuple[OpSpec, ...]
    ghost: frozenset[str]
    fallback: tuple[str, ...]
    uses: dict[str, tuple[str, ...]] = {}


# A parameter used twice is handled when it is an embedding tied to a linear output layer
# (GPT-2's wte and lm_head): its two pieces' cross term is certified in `funcdp.ghost.tied`.
TIED = ("ghost embedding.weight", "ghost linear.weight")


def handled(uses: list[str] | tuple[str, ...]) -> bool:
    """Whether ghost clipping handles a parameter used this way."""
    if len(uses) == 1:
        return uses[0].startswith("ghost ")
    return tied(uses)


def tied(uses: list[str] | tuple[str, ...]) -> bool:
    """Whether a parameter used this way is an embedding tied to a linear output layer."""
    return tuple(sorted(uses)) == TIED


def row_free(plan: Plan) -> bool:
    """Whether every per-example gradient the loss gives is free of its row and of the batch's
    size, as far as the row check bounds (`funcdp.ghost.rows`): each parameter used once, in a
    slot of a supported op (or an embedding tied to its output layer). Then a product over
    several positions is checked, one over a single position is an outer product (nothing
    summed), and the other ops sum over the example's own positions (torch's reductions, which
    a scan found independent of the batch's size). A parameter used otherwise (a recurrent time
    loop, `conv_transpose`, `einsum`, a view of it, an elementwise use), or by nothing the probe
    saw (unused, or read by a `torch.ops` call), is not: its per-example gradient may round by
    row and by the batch's size without a bound (a crafted `conv_transpose` example moved a sum
    by 1.07 C between a lone row and two). Run on a plan with `vmap_all`."""
    return all(handled(uses) for uses in plan.uses.values())


def _bind(func: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kind, names, defaults = _SIGNATURES[func]
    values = dict(defaults)
    values.update(zip(names, args, strict=False))  # trailing arguments may be left out
    if kind == ADDMM:
        kwargs = {_ADDMM_KEYWORDS.get(k, k): v for k, v in kwargs.items()}
    values.update(kwargs)
    if kind == CONV:
        values["nd"] = _CONV_DIMS[func]
    return values


def _config(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    if kind == CONV:
        return {k: values[k] for k in ("nd", "stride", "padding", "dilation", "groups")}
    if kind == EMBEDDING:
        weight = values["weight"]
        padding = values["padding_idx"]
        if padding is not None and padding < 0:
            padding += weight.shape[0]
        return {"padding_idx": padding, "num_embeddings": weight.shape[0]}
    if kind == LAYER_NORM:
        return {"normalized_shape": tuple(values["normalized_shape"]), "eps": values["eps"]}
    if kind == GROUP_NORM:
        return {"num_groups": values["num_groups"], "eps": values["eps"]}
    return {}


def _supported(kind: str, values: dict[str, Any]) -> bool:
    """Whether the op's weight and bias slots can be ghost-clipped with these arguments."""
    if kind == EMBEDDING:  # max_norm rewrites the weight; freq scaling mixes positions
        return values["max_norm"] is None and not values["scale_grad_by_freq"]
    if kind == GROUP_NORM:
        return values["input"].dim() >= 2
    if kind == ADDMM:  # beta * bias + alpha * x @ weight: only the plain sum, a vector bias
        bias = values.get("bias")
        plain = _is_one(values["beta"]) and _is_one(values["alpha"])
        return plain and values["input"].dim() == 2 and (bias is None or bias.dim() == 1)
    return True


def _is_one(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and value == 1


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property of Tensor: the descriptor carries its name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Spy(TorchFunctionMode):
    """Records, for each parameter, every use; and the candidate ops in call order."""

    def __init__(self, names_by_id: dict[int, str]) -> None:
        super().__init__()
        self.names_by_id = names_by_id
        self.uses: dict[str, list[str]] = {name: [] for name in names_by_id.values()}
        self.candidates: list[tuple[str, str | None, str | None, dict, torch.Tensor]] = []

    def _name(self, value: Any) -> str | None:
        return self.names_by_id.get(id(value)) if isinstance(value, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SIGNATURES:
            values = _bind(func, args, kwargs)
            kind = _SIGNATURES[func][0]
            ok = _supported(kind, values) and isinstance(out, torch.Tensor)
            slots = {}
            for slot, value in values.items():
                name = self._name(value)
                if name is not None:
                    captured = ok and slot in ("weight", "bias")
                    self.uses[name].append(f"ghost {kind}.{slot}" if captured else f"{kind}.{slot}")
                    if captured:
                        slots[slot] = name
            if slots:
                config = _config(kind, values)
                self.candidates.append((kind, slots.get("weight"), slots.get("bias"), config, out))
        elif _func_name(func) not in _HARMLESS:
            for value in optree.tree_leaves((args, kwargs)):
                name = self._name(value)
                if name is not None:
                    self.uses[name].append(_func_name(func) or repr(func))
        return out


def signature(params: Mapping[str, torch.Tensor], batch) -> tuple:
    """What a plan depends on, to run the probe once per value: each parameter's name, shape,
    dtype and device, and one example's shapes, dtypes and devices (not the batch's size)."""
    return (
        tuple((n, p.shape, p.dtype, p.device) for n, p in params.items()),
        tuple((x.shape[1:], x.dtype, x.device) for x in batch),
    )


@torch.compiler.disable  # a probe, run once per signature: eager inside a compiled step
def plan(
    loss_fn: Callable[..., Any],
    params: Mapping[str, torch.Tensor],
    batch,
    *,
    conv_explicit: str = "vmap",
    vmap_all: bool = False,
) -> Plan:
    """Runs the loss on the first example and decides which parameters ghost clipping handles
    (none with `vmap_all`: the vmap engine's plan, whose ops are the checked ones only).

    The probe works on detached copies that require grad (so that layers which branch on
    `requires_grad` take the path they take in training); the caller's tensors are untouched.
    With `conv_explicit="vmap"`, a conv weight whose explicit per-example gradient is cheaper
    than ghost clipping (T (p + d) >= p d) goes to the vmap fallback, whose batched conv backward
    forms that gradient faster than im2col ("mixed" ghost clipping, Bu et al. 2022); with
    "unfold" it stays here and the rules form it from the unfolded input.
    """
    if conv_explicit not in ("vmap", "unfold"):
        raise ValueError(f'conv_explicit must be "vmap" or "unfold", got {conv_explicit!r}')
    copies = {
        name: p.detach().requires_grad_(p.is_floating_point() or p.is_complex())
        for name, p in params.items()
    }
    spy = _Spy({id(p): name for name, p in copies.items()})
    first = tuple(x[:1] for x in batch)
    cuda = sorted({p.device.index or 0 for p in copies.values() if p.device.type == "cuda"})
    # The probe's random draws (dropout) must not move torch's generators: fork them.
    with torch.random.fork_rng(devices=cuda), torch.enable_grad(), spy:
        vmap(lambda *example: loss_fn(copies, *example), randomness="different")(*first)
    ghost = set() if vmap_all else {name for name, uses in spy.uses.items() if handled(uses)}
    if conv_explicit == "vmap":
        for kind, weight, bias, config, out in spy.candidates:
            if kind != CONV or weight not in ghost:
                continue
            if _explicit_is_cheaper(copies[weight], out, config):
                ghost.difference_update({weight, bias})  # the bias alone is not worth a tap
    # Fallback weights of a product over several positions; every product use of one is checked.
    checked = {
        weight
        for kind, weight, _, config, out in spy.candidates
        if kind in PRODUCTS
        and weight is not None
        and weight not in ghost
        and _positions(kind, config, out) > 1
    }
    ops = []
    for kind, weight, bias, config, out in spy.candidates:
        check = weight if weight in checked and kind in PRODUCTS else None
        weight = weight if weight in ghost else None
        bias = bias if bias in ghost else None
        if weight is not None or bias is not None or check is not None:
            ops.append(OpSpec(kind, weight, bias, config, tuple(out.shape), out.dtype, check))
    fallback = tuple(name for name in params if name not in ghost)
    uses = {name: tuple(found) for name, found in spy.uses.items()}
    return Plan(tuple(ops), frozenset(ghost), fallback, uses)


def _positions(kind: str, config, out: torch.Tensor) -> int:
    """How many positions (of all its leading dimensions) a product op's output holds: a
    linear's features are its last dimension, a conv's channels precede its nd spatial ones."""
    if kind == CONV:
        return math.prod(out.shape[-config["nd"] :]) * math.prod(out.shape[: -config["nd"] - 1])
    return out.numel() // max(out.shape[-1], 1)


def _explicit_is_cheaper(weight: torch.Tensor, out: torch.Tensor, config) -> bool:
    """T (p + d) >= p d for a conv: T output positions, p outputs and d inputs per group.

    Ghost costs T^2 (p + d) for the norm and T p d for the clipped sum; the vmap fallback's
    grouped conv backward forms each example's gradient for about twice T p d on the CPU (its
    clipped sum, p d, is negligible). On the benchmark's CNN and ResNet-18 this rule gives a
    faster step than the space rule 2 T^2 >= p d (Li et al. 2022); see bench/RESULTS.md.
    """
    out_channels = weight.shape[0] // config["groups"]
    positions = out.numel() // weight.shape[0]
    inputs = weight[0].numel()  # (C / groups) * prod(kernel)
    return positions * (out_channels + inputs) >= out_channels * inputs


# The first line of the tapper's errors is the cause; this second line, what a user can do.
_PATH_HINT = (
    '\nGhost clipping cannot follow a loss whose path changes; Performance(mode="vmap") '
    "takes it (each example computed alone, slower)"
)


class Tapper(TorchFunctionMode):
    """Adds `taps[k]` to the output of the k-th planned op and records the op's input.

    Used inside `vmap(grad(...))` over one example; `inputs` holds the recorded inputs in op
    order once the loss has run. `params` maps the names the ops hold to the tensors the loss
    receives. Raises if the forward leaves the path the probe saw.
    """

    def __init__(
        self, params: Mapping[str, torch.Tensor], ops: tuple[OpSpec, ...], taps: list
    ) -> None:
        super().__init__()
        self.ops = ops
        self.taps = taps
        self.inputs: list[torch.Tensor] = []
        self.ghost = {n for op in ops for n in (op.weight, op.bias) if n is not None}
        self.checked = {op.checked for op in ops if op.checked is not None}
        self.params = {n: params[n] for n in self.ghost | self.checked}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _SIGNATURES:
            return out
        values = _bind(func, args, kwargs)
        weight, bias = self._name_of(values.get("weight")), self._name_of(values.get("bias"))
        seen = (
            weight if weight in self.ghost else None,
            bias if bias in self.ghost else None,
            weight if _SIGNATURES[func][0] in PRODUCTS and weight in self.checked else None,
        )
        if seen == (None, None, None):
            return out
        index = len(self.inputs)
        spec = self.ops[index] if index < len(self.ops) else None
        if spec is None or (spec.weight, spec.bias, spec.checked) != seen:
            raise RuntimeError(
                f"funcdp's tapped pass: the forward called op {index} with parameters {seen}, "
                "but the probe saw "
                f"{None if spec is None else (spec.weight, spec.bias, spec.checked)}; the loss "
                "must take the same path for every example and every call" + _PATH_HINT
            )
        self.inputs.append(values["input"])
        return out + self.taps[index]

    def _name_of(self, tensor) -> str | None:
        """The tapped parameter that `tensor` is, by identity (`is`, not `id()`, which a
        compiled step would guard on and recompile for at every new parameter tensor)."""
        if tensor is None:
            return None
        return next((name for name, p in self.params.items() if p is tensor), None)

    def check_complete(self) -> None:
        """Raises unless every planned op was seen."""
        if len(self.inputs) != len(self.ops):
            raise RuntimeError(
                f"funcdp's tapped pass: the forward ran {len(self.inputs)} of the {len(self.ops)} "
                "ops the probe saw; the loss must take the same path for every example and every "
                "call" + _PATH_HINT
            )
