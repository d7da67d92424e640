"""Streaming per-unit statistics: max, argmax, sum and count, kept on the device.

UnitMem needs, per unit u over the N samples of a split, mu_max(u), the first sample reaching
it, and sum_x mu_u(x) (the mean of the others is (sum - max) / (N - 1)). These stream: a
state of O(splits x units) is updated batch by batch, exactly, whatever N.

Exactness rules:
- argmax is the smallest sample id among those reaching the max, so the result does not
  depend on batch size, device count or order of arrival. "Reaching" allows float32 rounding
  (TIE_RTOL): mu_max is then the value of that sample.
- sum is accumulated with Kahan compensation in float32 on the device (no float64 on most
  accelerators) and written as float64; its relative error stays ~1e-7 for any N.
- rows with `valid = False` (padding of the last batch) never touch the state.

Shape letters: S splits, U units, B batch, K scales.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

_NO_ID = np.iinfo(np.int32).max  # argmax of a unit that has seen no sample yet
# Values this close count as tied. The same image computed in another batch composition (other
# batch size, device count, or after a resume) differs by float32 rounding (~3e-7 relative
# measured on CPU), so exact comparison would let batching pick among duplicates or among
# samples that share a class token (scale 0 depends on the label alone).
TIE_RTOL = 1e-5


def init_state(num_splits: int, num_units: int, num_scales: int = 0) -> dict[str, np.ndarray]:
    """Empty statistics for S splits (and, with num_scales > 0, per-scale statistics too)."""
    S, U = num_splits, num_units
    st = {
        "max": np.full((S, U), -np.inf, np.float32),
        "argmax": np.full((S, U), _NO_ID, np.int32),
        "sum": np.zeros((S, U), np.float32),
        "comp": np.zeros((S, U), np.float32),  # Kahan compensation of sum
        "count": np.zeros((S,), np.int32),
    }
    if num_scales:
        K = num_scales
        st.update({
            "scale_max": np.full((S, K, U), -np.inf, np.float32),
            "scale_argmax": np.full((S, K, U), _NO_ID, np.int32),
            "scale_sum": np.zeros((S, K, U), np.float32),
            "scale_comp": np.zeros((S, K, U), np.float32),
        })
    return st


def _near(a, b):
    """a within TIE_RTOL of b (relative to the larger magnitude)."""
    return jnp.abs(a - b) <= TIE_RTOL * jnp.maximum(jnp.abs(a), jnp.abs(b))


def _update_max(cur_max, cur_arg, mu_BX, ids_B, member_B):
    """Fold a batch into (max, argmax) of shape X for one split (X = U or K x U)."""
    extra = (1,) * (mu_BX.ndim - 1)
    m = member_B.reshape((-1,) + extra)
    vals = jnp.where(m, mu_BX, -jnp.inf)
    ids = jnp.broadcast_to(ids_B.reshape((-1,) + extra), vals.shape)
    bmax = jnp.max(vals, axis=0)
    # Tied rows (within rounding of the batch max): the smallest id wins, with its own value.
    tied = m & (_near(vals, bmax[None]) | (vals == bmax[None]))
    barg = jnp.min(jnp.where(tied, ids, _NO_ID), axis=0)
    bval = jnp.max(jnp.where(tied & (ids == barg[None]), vals, -jnp.inf), axis=0)
    tie = _near(bval, cur_max)
    take = (~tie & (bval > cur_max)) | (tie & (barg < cur_arg))
    return jnp.where(take, bval, cur_max), jnp.where(take, barg, cur_arg)


def _kahan(total, comp, x):
    y = x - comp
    t = total + y
    return t, (t - total) - y


def update(state: Mapping[str, jnp.ndarray], mu_BU: jnp.ndarray, ids_B: jnp.ndarray,
           split_B: jnp.ndarray, valid_B: jnp.ndarray,
           scale_mu_BKU: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
    """Fold one batch into the state (pure; jit-able).

    Args:
      state: from `init_state` (as device arrays).
      mu_BU: float32 (B, U), each sample's unit activations (already averaged over augs).
      ids_B: int32 (B,) sample ids; split_B: int32 (B,) split index; valid_B: bool (B,).
      scale_mu_BKU: optional float32 (B, K, U), the per-scale activations.
    Returns:
      the new state.
    """
    new = dict(state)
    S = state["max"].shape[0]
    maxs, args, sums, comps, counts = [], [], [], [], []
    smaxs, sargs, ssums, scomps = [], [], [], []
    for s in range(S):  # S is 1 or 2: a static loop keeps every update a plain reduction
        member = valid_B & (split_B == s)
        mx, ag = _update_max(state["max"][s], state["argmax"][s], mu_BU, ids_B, member)
        t, c = _kahan(state["sum"][s], state["comp"][s], jnp.sum(jnp.where(member[:, None], mu_BU, 0.0), 0))
        maxs.append(mx); args.append(ag); sums.append(t); comps.append(c)
        counts.append(state["count"][s] + jnp.sum(member).astype(jnp.int32))
        if scale_mu_BKU is not None:
            mx, ag = _update_max(state["scale_max"][s], state["scale_argmax"][s], scale_mu_BKU, ids_B, member)
            t, c = _kahan(state["scale_sum"][s], state["scale_comp"][s],
                          jnp.sum(jnp.where(member[:, None, None], scale_mu_BKU, 0.0), 0))
            smaxs.append(mx); sargs.append(ag); ssums.append(t); scomps.append(c)
    new.update(max=jnp.stack(maxs), argmax=jnp.stack(args), sum=jnp.stack(sums),
               comp=jnp.stack(comps), count=jnp.stack(counts))
    if scale_mu_BKU is not None:
        new.update(scale_max=jnp.stack(smaxs), scale_argmax=jnp.stack(sargs),
                   scale_sum=jnp.stack(ssums), scale_comp=jnp.stack(scomps))
    return new


def split_arrays(state: Mapping[str, np.ndarray], s: int) -> dict[str, np.ndarray]:
    """The statistics of split s in the on-disk layout of docs/design.md (stats_{split}.npz)."""
    out = {
        "max": np.asarray(state["max"][s], np.float32),
        "argmax": np.asarray(state["argmax"][s], np.int64),
        # The compensation holds the part of the sum that float32 could not yet absorb.
        "sum": np.asarray(state["sum"][s], np.float64) - np.asarray(state["comp"][s], np.float64),
        "count": np.asarray(state["count"][s], np.int64),
    }
    if "scale_max" in state:
        out["scale_max"] = np.asarray(state["scale_max"][s], np.float32)
        out["scale_argmax"] = np.asarray(state["scale_argmax"][s], np.int64)
        out["scale_sum"] = (np.asarray(state["scale_sum"][s], np.float64)
                            - np.asarray(state["scale_comp"][s], np.float64))
    return out


def to_host(state: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    return jax.device_get(dict(state))
