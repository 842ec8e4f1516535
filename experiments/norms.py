"""Sparsity and training on inputs of non-unit norm, and what ``normalize=True`` restores.

The threshold ``b = sqrt(0.4 ln m)`` and the capacities assume ``||x|| = 1``: at init
``<w_r, x>`` is normal with variance ``||x||^2``, so on points of norm ``s`` a neuron fires
with probability ``Q(b / s)`` instead of ``Q(b)``. This experiment takes the planted-teacher
task (unit-norm points), scales every point by ``s`` (its first factor), and for each ``s``
trains the same network (same key, optimizer and batches) with ``kronjax.fit``, recording

  * the mean active neurons per point over all ``n`` training points, at init and at the end,
    against ``m Q(b)`` (unit norm) and ``m Q(b / s)`` (norm ``s``);
  * the training loss at the start and the end, and whether training stopped on a non-finite
    loss (``on_nonfinite="stop"``) and the capacity replays.

A last row passes the most scaled points through ``Dataset(..., normalize=True)``.
Shapes: m neurons, n points.

    kronjax run configs/norms.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import runner as experiment
from kronjax.experiments.runner import gaussian_tail


@dataclasses.dataclass(frozen=True)
class Params:
  """Input scales and the training run every scale gets (planted regression task)."""
  scales: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0)
  width: int = 2048
  n: int = 512
  dims: tuple[int, ...] = (64, 64)
  batch_size: int = 16
  learning_rate: float = 8.0
  steps: int = 500
  init: str = "kronecker"
  seed: int = 0

  def __post_init__(self):
    experiment.require_positive(self, "width", "n", "batch_size", "steps")
    if not self.scales or any(float(s) <= 0 for s in self.scales):
      raise ValueError(f"params.scales must be positive numbers, got {self.scales!r}.")


def scaled(data: kronjax.KronData, scale: float) -> kronjax.KronData:
  """Every point of ``data`` times ``scale`` (its first factor scaled)."""
  first, *rest = data.factors
  return kronjax.KronData((first * scale, *rest))


def active_per_point(state: kronjax.TrainState) -> float:
  """Mean over all training points of the neurons that fire, ``(P > b).sum(0).mean()``."""
  return float(jnp.mean(jnp.sum(state.P > state.b, axis=0)))


def train_one(p: Params, dataset: kronjax.Dataset, key: jax.Array,
              plan: kronjax.Plan | None = None) -> dict:
  """Init and ``p.steps`` steps of SGD on ``dataset``; active counts, losses and outcome."""
  config = kronjax.Config(width=p.width, init=p.init)
  kinit, kfit = jax.random.split(key)
  state = kronjax.init(kinit, config, dataset, optax.sgd(p.learning_rate), plan=plan)
  active_init, loss_init = active_per_point(state), float(kronjax.evaluate(state, dataset)["train_loss"])
  state, hist = kronjax.fit(state, dataset, kfit, batch_size=p.batch_size, steps=p.steps,
                            on_nonfinite="stop", progress=False)
  return {"active_init": active_init, "active_final": active_per_point(state),
          "max_active_in_a_batch": int(np.max(hist["max_active"])),
          "loss_init": loss_init, "loss_final": float(kronjax.evaluate(state, dataset)["train_loss"]),
          "stopped": hist["stopped"], "steps_run": int(state.step), "replays": len(hist["replays"]),
          "final_active_capacity": state.resolved_plan.active_capacity,
          "fit_seconds": hist["seconds"]}


def plot(rows: list[dict], out_dir: pathlib.Path) -> str:
  plt = experiment.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  raw = [r for r in rows if not r["normalized"]]
  s = [r["scale"] for r in raw]
  ax.plot(s, [r["active_init"] for r in raw], "o-", label="active at init")
  ax.plot(s, [r["active_final"] for r in raw], "s-", label="active after training")
  ax.plot(s, [r["m_Q_b_over_s"] for r in raw], "k:", label="m Q(b / s)")
  for r in rows:
    if r["normalized"]:
      ax.plot([r["scale"]], [r["active_final"]], "*", ms=12, color="C2",
              label=f"scaled by {r['scale']:g}, normalize=True: after training")
  ax.axhline(raw[0]["m_Q_b"], color="gray", ls="--", lw=0.8, label="m Q(b)")
  ax.set(xscale="log", yscale="log", xlabel="input norm s", ylabel="active neurons per point",
         title=f"Active neurons against the input norm (m = {rows[0]['m']})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, "norms.png", dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  out_dir = pathlib.Path(out_dir)
  key = jax.random.PRNGKey(params.seed)
  kdata, ktrain = jax.random.split(key)
  data, labels = kronjax.data.planted(kdata, params.n, dims=tuple(params.dims))
  b = kronjax.Config(width=params.width).resolve().threshold
  runs = [(float(s), False) for s in params.scales] + [(float(max(params.scales)), True)]
  rows = []
  for scale, normalize in runs:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", kronjax.NormWarning)  # the point of the experiment
      dataset = kronjax.Dataset(scaled(data, scale), labels, normalize=normalize)
    sq = np.asarray(dataset.data.sq_norms())
    result = train_one(params, dataset, ktrain, plan)
    row = {"scale": scale, "normalized": normalize, "m": params.width,
           "median_sq_norm": float(np.median(sq)), "m_Q_b": params.width * gaussian_tail(b),
           "m_Q_b_over_s": params.width * gaussian_tail(b / (1.0 if normalize else scale)),
           **result}
    rows.append(row)
    if progress:
      print(f"norms: s={scale:g}{' normalized' if normalize else ''}: active "
            f"{row['active_init']:.1f} -> {row['active_final']:.1f}, loss {row['loss_init']:.3g} -> "
            f"{row['loss_final']:.3g}{', stopped: ' + row['stopped'] if row['stopped'] else ''}",
            flush=True)
  table = [{"inputs": (f"scaled by {r['scale']:g}, normalize=True" if r["normalized"]
                       else f"scaled by {r['scale']:g}"),
            "median ||x||^2": r["median_sq_norm"], "m Q(b)": r["m_Q_b"],
            "m Q(b/s)": r["m_Q_b_over_s"], "active at init": r["active_init"],
            "active at end": r["active_final"], "loss start": r["loss_init"],
            "loss end": r["loss_final"], "stopped": r["stopped"] or "no",
            "replays": r["replays"]} for r in rows]
  metrics = {"runs": rows, "threshold": b, "width": params.width, "n": params.n,
             "steps": params.steps, "batch_size": params.batch_size,
             "learning_rate": params.learning_rate}
  return {"metrics": metrics, "table": table, "plots": [plot(rows, out_dir)]}
