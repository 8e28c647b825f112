"""Parameter merging of branch state dicts (docs/method.md §6, "final: theta* = sum_k w_k theta_k").

Works on plain dicts name -> Tensor. Each method is a small per-tensor function in
MERGE_METHODS. A Merger validates a method, its weights and options once and then merges one
key's K values at a time (what a merge streaming weights from disk needs); merge_state_dicts
is the in-memory API built on it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

# A per-tensor combiner: (stacked thetas [K, ...], weights [K] or None, base or None, options).
Combine = Callable[..., Tensor]


@dataclass(frozen=True)
class MergeMethod:
    combine: Combine
    needs_base: bool = False
    weights: str = "forbidden"  # "forbidden", "required" (normalised to sum 1), "optional"
    defaults: dict = field(default_factory=dict)


def _mean(thetas_K: Tensor, weights_K, base, options) -> Tensor:
    return thetas_K.mean(dim=0)


def _weighted(thetas_K: Tensor, weights_K: Tensor, base, options) -> Tensor:
    # sum_k w_k theta_k with sum_k w_k = 1 (normalised by the caller).
    return torch.tensordot(weights_K, thetas_K, dims=1)


def _task_arithmetic(thetas_K: Tensor, weights_K: Tensor, base: Tensor, options) -> Tensor:
    # Ilharco et al. 2023: theta = base + scale * sum_k w_k (theta_k - base).
    taus_K = thetas_K - base
    return base + options["scale"] * torch.tensordot(weights_K, taus_K, dims=1)


def _trim_to_density(taus_K_N: Tensor, density: float) -> Tensor:
    # TIES step 1 (trim): keep each task vector's top ceil(density * n) entries by
    # magnitude. A stable descending sort breaks ties at the threshold by the lower
    # index, so exactly that many entries survive, deterministically on every device.
    n = taus_K_N.shape[-1]
    keep = min(n, max(1, math.ceil(density * n - 1e-9)))
    order_K_N = torch.sort(taus_K_N.abs(), dim=-1, descending=True, stable=True).indices
    keep_K_N = torch.zeros_like(taus_K_N, dtype=torch.bool)
    keep_K_N.scatter_(-1, order_K_N[:, :keep], True)
    return torch.where(keep_K_N, taus_K_N, torch.zeros_like(taus_K_N))


def _ties(thetas_K: Tensor, weights_K, base: Tensor, options) -> Tensor:
    # Yadav et al. 2023, TIES-merging: trim, elect sign, disjoint mean.
    shape = base.shape
    taus_K_N = (thetas_K - base).reshape(thetas_K.shape[0], -1)
    trimmed_K_N = _trim_to_density(taus_K_N, options["density"])
    # Step 2 (elect): sign of the summed trimmed vectors (the sign with more total mass).
    elected_N = torch.sign(trimmed_K_N.sum(dim=0))
    # Step 3 (disjoint mean): average only the nonzero entries agreeing with that sign;
    # entries with no agreeing value (elected sign 0 or all trimmed) stay 0.
    agree_K_N = (trimmed_K_N != 0) & (torch.sign(trimmed_K_N) == elected_N)
    summed_N = torch.where(agree_K_N, trimmed_K_N, torch.zeros_like(trimmed_K_N)).sum(dim=0)
    merged_N = summed_N / agree_K_N.sum(dim=0).clamp(min=1)
    return base + options["scale"] * merged_N.reshape(shape)


MERGE_METHODS: dict[str, MergeMethod] = {
    "mean": MergeMethod(_mean),
    "weighted": MergeMethod(_weighted, weights="required"),
    "task_arithmetic": MergeMethod(
        _task_arithmetic, needs_base=True, weights="optional", defaults={"scale": 1.0}
    ),
    "ties": MergeMethod(_ties, needs_base=True, defaults={"scale": 1.0, "density": 0.2}),
}


def _resolve_weights(name: str, spec: MergeMethod, weights, k: int) -> Tensor | None:
    if weights is None:
        if spec.weights == "required":
            raise ValueError(f"merge method {name!r} needs weights (one per state dict)")
        # task_arithmetic defaults to 1/K each, so with scale 1 it equals the mean.
        return torch.full((k,), 1.0 / k) if spec.weights == "optional" else None
    if spec.weights == "forbidden":
        raise ValueError(f"merge method {name!r} takes no weights; use method='weighted'")
    if len(weights) != k:
        raise ValueError(
            f"merge method {name!r}: got {len(weights)} weights for {k} state dicts"
        )
    weights_K = torch.tensor([float(w) for w in weights], dtype=torch.float32)
    # Only "weighted" normalises: task-arithmetic coefficients are free scalings by design.
    if spec.weights == "required":
        if weights_K.sum() <= 0:
            raise ValueError(f"merge method {name!r}: weights must sum to > 0, got {weights}")
        weights_K = weights_K / weights_K.sum()
    return weights_K


def _resolve_options(name: str, spec: MergeMethod, options: dict) -> dict:
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "none"
        raise ValueError(f"merge method {name!r}: unknown options {unknown}; valid: {valid}")
    resolved = {**spec.defaults, **options}
    if "density" in resolved and not 0.0 < resolved["density"] <= 1.0:
        density = resolved["density"]
        raise ValueError(f"merge method {name!r}: density must be in (0, 1], got {density}")
    return resolved


def _check_keys(state_dicts: list[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None) -> None:
    keys = set(state_dicts[0])
    others = [(f"state dict {i}", sd) for i, sd in enumerate(state_dicts)]
    others += [("base", base)] if base is not None else []
    for label, sd in others:
        if set(sd) != keys:
            diff = sorted(keys.symmetric_difference(sd))
            raise ValueError(
                f"{label} does not share keys with state dict 0; differing keys: {diff[:5]}"
            )
        for key in keys:
            if sd[key].shape != state_dicts[0][key].shape:
                raise ValueError(
                    f"key {key!r}: shape {tuple(sd[key].shape)} in {label} "
                    f"!= {tuple(state_dicts[0][key].shape)} in state dict 0"
                )


def _method_spec(method: str, k: int, has_base: bool) -> MergeMethod:
    """The method's spec, after the checks that come before any tensor is looked at."""
    if method not in MERGE_METHODS:
        valid = ", ".join(sorted(MERGE_METHODS))
        raise ValueError(f"unknown merge method {method!r}; valid methods: {valid}")
    if k < 1:
        raise ValueError(f"merge method {method!r} needs at least one state dict")
    spec = MERGE_METHODS[method]
    if spec.needs_base and not has_base:
        raise ValueError(f"merge method {method!r} needs base= (the common starting weights)")
    return spec


@dataclass(frozen=True, eq=False)  # eq would compare weight tensors
class Merger:
    """One merge method for K inputs, validated once, then applied one key at a time.

    A caller that streams weights from disk merges key by key with merge_tensor, so it never
    holds more than one key's K values; merge_state_dicts does the same over whole dicts.
    """

    method: str
    spec: MergeMethod
    k: int
    weights_K: Tensor | None
    options: dict

    @classmethod
    def create(
        cls, method: str, k: int, weights: list[float] | None = None, has_base: bool = False, **options
    ) -> Merger:
        """Raises ValueError for an unknown method, a missing base, bad weights or options."""
        spec = _method_spec(method, k, has_base)
        weights_K = _resolve_weights(method, spec, weights, k)
        return cls(method, spec, k, weights_K, _resolve_options(method, spec, options))

    def merge_tensor(self, values_K: Iterable[Tensor], base: Tensor | None = None) -> Tensor:
        """The merged value of one key from its K values (an iterable, consumed one value at a time).

        Floating tensors are combined in at least float32 and cast back to the first value's
        dtype; a non-floating tensor (an integer buffer) is the first value, copied, and the
        other values are not drawn at all.
        """
        values = iter(values_K)
        first = next(values, None)
        if first is None:
            raise ValueError(f"merge method {self.method!r}: got no values for {self.k} inputs")
        if not first.is_floating_point():
            return first.detach().clone()
        if self.spec.needs_base and base is None:
            raise ValueError(f"merge method {self.method!r} needs base= (the common starting weights)")
        # float32 at least: bf16/fp16 averaging would round every partial sum.
        work = torch.promote_types(first.dtype, torch.float32)
        # Filled in place, value by value, so the K inputs need not all be held besides the stack.
        thetas_K = torch.empty((self.k, *first.shape), dtype=work, device=first.device)
        count = 0
        for count, value in enumerate(itertools.chain([first], values), 1):
            if count > self.k:
                raise ValueError(f"merge method {self.method!r}: got more than {self.k} values")
            thetas_K[count - 1].copy_(value.detach())
        if count != self.k:
            raise ValueError(f"merge method {self.method!r}: got {count} values for {self.k} inputs")
        base_t = None if base is None else base.detach().to(first.device, work)
        w_K = None if self.weights_K is None else self.weights_K.to(device=first.device, dtype=work)
        return self.spec.combine(thetas_K, w_K, base_t, self.options).to(first.dtype)

    def merge_state_dicts(
        self, state_dicts: list[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Every key of K whole state dicts (keys and shapes checked first); inputs untouched."""
        if len(state_dicts) != self.k:
            raise ValueError(f"merge method {self.method!r}: got {len(state_dicts)} state dicts for {self.k}")
        _check_keys(state_dicts, base)
        return {
            key: self.merge_tensor((sd[key] for sd in state_dicts), None if base is None else base[key])
            for key in state_dicts[0]
        }


def merge_state_dicts(
    state_dicts: list[dict[str, Tensor]],
    method: str = "mean",
    weights: list[float] | None = None,
    base: dict[str, Tensor] | None = None,
    **options,
) -> dict[str, Tensor]:
    """Merge K state dicts with one of MERGE_METHODS; returns a new dict (inputs untouched).

    Floating tensors are combined in at least float32 and cast back to their dtype;
    non-floating tensors (integer buffers) are copied from the first state dict.
    """
    # The checks run in the order they always have, so one input with several faults names the same one.
    _method_spec(method, len(state_dicts), base is not None)
    _check_keys(state_dicts, base)
    merger = Merger.create(method, len(state_dicts), weights, base is not None, **options)
    return merger.merge_state_dicts(state_dicts, base)
