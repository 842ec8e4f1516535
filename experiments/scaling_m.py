"""Step time and active neurons per point vs the width ``m``.

For each ``m = 2**k`` (``k`` in ``[log2_m_min, log2_m_max]``) at the paper's
threshold ``b = sqrt(0.4 ln m)``:

  * the number of active neurons per point at init, measured over all ``n``
    points (``P[:, j] > b``), against its expectation ``m Q(b)`` (Binomial, so a
    per-point standard deviation ``sqrt(m Q (1 - Q))``) and the paper's bound
    ``m^(4/5)``;
  * the median wall time of one ``kronjax.jit_train_step`` (jit-compiled, donated)
    (SGD, batch ``B``) after compilation, and the active count it reports.

Shapes: m neurons, n points, B batch.

    kronjax run configs/scaling_m.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import runner as experiment
from kronjax.experiments import timing
from kronjax.experiments.runner import gaussian_tail


@dataclasses.dataclass(frozen=True)
class Params:
  """Sizes of the sweep over ``m`` (synthetic unit-norm Gaussian factors)."""
  log2_m_min: int = 10
  log2_m_max: int = 16
  n: int = 512
  dims: tuple[int, ...] = (32, 32)
  batch_size: int = 32
  learning_rate: float = 1.0
  init: str = "implicit"
  timed_steps: int = 30
  warmup_steps: int = 3
  seed: int = 0


def active_at_init(P: jax.Array, b: float) -> dict[str, float]:
  """Active neurons per point ``(P[:, j] > b).sum()`` over the ``n`` columns, vs ``m Q(b)``."""
  m, n = P.shape
  counts = np.asarray(jnp.sum(P > b, axis=0))
  q = gaussian_tail(b)
  expected = m * q
  sigma = math.sqrt(m * q * (1.0 - q))
  mean = float(counts.mean())
  return {"active_mean": mean, "active_std": float(counts.std()), "active_max": int(counts.max()),
          "expected": expected, "sigma_point": sigma,
          "z_mean": (mean - expected) / (sigma / math.sqrt(n)),
          "bound_m45": m ** 0.8}


def measure_width(p: Params, m: int, dataset: kronjax.Dataset, key: jax.Array,
                  plan: kronjax.Plan | None = None) -> tuple[dict[str, object], dict]:
  """One row: init statistics and steady-state step time at width ``m``."""
  config = kronjax.Config(width=m, init=p.init)
  state = kronjax.init(key, config, dataset, optax.sgd(p.learning_rate), plan=plan)
  b = state.config.threshold  # the paper's sqrt(0.4 ln m)
  row: dict[str, object] = {"m": m, "b": b, "Q_b": gaussian_tail(b), "index": state.index_kind,
                            "active_capacity": state.resolved_plan.active_capacity}
  row.update(active_at_init(state.P, b))
  total = p.warmup_steps + p.timed_steps
  perm = np.random.default_rng(p.seed).permutation(total * p.batch_size) % dataset.n
  batches = [jnp.asarray(perm[i * p.batch_size:(i + 1) * p.batch_size], jnp.int32)
             for i in range(total)]
  seen: list[dict] = []

  def timed(state, batch):
    state, metrics = kronjax.jit_train_step(state, dataset, batch)
    seen.append(metrics)
    return state, metrics

  times, state = timing.time_steps(timed, state, batches, warmup=p.warmup_steps)
  seen = jax.device_get(seen)
  row.update({"step_ms": 1e3 * times["median_s"], "step_ms_p10": 1e3 * times["p10_s"],
              "step_ms_p90": 1e3 * times["p90_s"],
              "train_active_mean": float(np.mean([s["active"] for s in seen])),
              "overflow_steps": int(sum(bool(s["overflow"]) for s in seen)),
              "index_rebuilds": int(seen[-1]["index_rebuilds"])})
  return row, times


def plot(rows: list[dict], out_dir: pathlib.Path, name: str = "scaling_m.png") -> str:
  plt = experiment.pyplot()
  ms = np.array([r["m"] for r in rows], float)
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
  ax0.errorbar(ms, [r["active_mean"] for r in rows], yerr=[r["active_std"] for r in rows],
               fmt="o", capsize=3, label="measured at init (mean ± std over points)")
  grid = np.geomspace(ms.min(), ms.max(), 100)
  expected = [g * gaussian_tail(kronjax.Config(width=int(g)).resolve().threshold) for g in grid]
  ax0.plot(grid, expected, "-", label=r"$m\,Q(b)$, $b=\sqrt{0.4\ln m}$")
  ax0.plot(grid, grid ** 0.8, "--", label=r"$m^{4/5}$ (paper's bound)")
  ax0.plot(grid, grid, ":", color="gray", label="m")
  ax0.set(xscale="log", yscale="log", xlabel="width m", ylabel="active neurons per point",
          title="Active neurons vs width")
  ax0.legend(fontsize=8)
  ax1.errorbar(ms, [r["step_ms"] for r in rows],
               yerr=[[r["step_ms"] - r["step_ms_p10"] for r in rows],
                     [r["step_ms_p90"] - r["step_ms"] for r in rows]], fmt="o-", capsize=3)
  ax1.set(xscale="log", yscale="log", xlabel="width m", ylabel="ms per step (median, p10-p90)",
          title="kronjax step time vs width")
  for ax in (ax0, ax1):
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, name, dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  out_dir = pathlib.Path(out_dir)
  if params.log2_m_min > params.log2_m_max:
    raise ValueError(f"log2_m_min={params.log2_m_min} must not exceed log2_m_max={params.log2_m_max}.")
  key = jax.random.PRNGKey(params.seed)
  kdata, kinit = jax.random.split(key)
  # i.i.d. Gaussian factors: nearly orthogonal points, so the per-point counts at init
  # are close to independent Binomial(m, Q(b)) draws and their mean has a known spread.
  data = kronjax.data.synthetic(kdata, params.n, tuple(params.dims))
  labels = jax.random.normal(jax.random.fold_in(kdata, 1), (params.n, 1))
  dataset = kronjax.Dataset(data, labels)
  rows, timings = [], {}
  for k in range(params.log2_m_min, params.log2_m_max + 1):
    m = 2 ** k
    row, times = measure_width(params, m, dataset, kinit, plan)
    rows.append(row)
    timings[f"step_m{m}"] = times
    if progress:
      print(f"scaling_m: m={m:6d} active {row['active_mean']:8.1f} (m Q(b) {row['expected']:8.1f}) "
            f"step {row['step_ms']:.2f} ms", flush=True)
  plots = [plot(rows, out_dir)]
  table = [{k: r[k] for k in ("m", "b", "index", "active_mean", "expected", "z_mean", "bound_m45",
                              "train_active_mean", "index_rebuilds", "step_ms")} for r in rows]
  worst_z = max(abs(r["z_mean"]) for r in rows)
  metrics = {"rows": rows, "max_abs_z_mean": worst_z,
             "all_below_m45": all(r["active_max"] < r["bound_m45"] for r in rows),
             "n": params.n, "d": math.prod(params.dims), "batch_size": params.batch_size}
  return {"metrics": metrics, "table": table, "plots": plots, "timings": timings}
