"""Active neurons per point over the course of training, for several widths.

The paper's claim: with ``b = sqrt(0.4 ln m)`` the number of neurons that fire
on a point stays ``o(m)`` during training, not just at init (where it is about
``m Q(b) < m^(4/5)``). For each width we train on the planted-teacher task
(``kronjax.data.planted``, squared loss, SGD) with ``kronjax.fit`` and record

  * per step: the mean and max active count over the batch (``fit``'s history);
  * every ``probe_every`` steps: the mean and max over *all* ``n`` training points
    (``(P > b).sum(0)``) and the full training loss.

Shapes: m neurons, n points.

    kronjax run configs/sparsity.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import runner as experiment
from kronjax.experiments.runner import gaussian_tail


@dataclasses.dataclass(frozen=True)
class Params:
  """Widths and training schedule (planted regression task)."""
  widths: tuple[int, ...] = (1024, 4096, 16384)
  n: int = 1024
  dims: tuple[int, ...] = (32, 32)
  batch_size: int = 16
  learning_rate: float = 8.0
  steps: int = 2000
  probe_every: int = 100
  init: str = "implicit"
  seed: int = 0


def probe(state: kronjax.TrainState, dataset: kronjax.Dataset) -> dict[str, float]:
  """Active neurons over all training points and the full training loss."""
  counts = jnp.sum(state.P > state.b, axis=0)
  loss = kronjax.evaluate(state, dataset)["train_loss"]
  counts, loss = jax.device_get((counts, loss))
  return {"active_mean": float(counts.mean()), "active_max": int(counts.max()), "loss": float(loss)}


def train_width(p: Params, m: int, dataset: kronjax.Dataset, key,
                plan: kronjax.Plan | None = None) -> dict:
  """Trains one width in chunks of ``probe_every`` steps; returns its traces."""
  config = kronjax.Config(width=m, init=p.init)
  state = kronjax.init(key, config, dataset, optax.sgd(p.learning_rate), plan=plan)
  fit_key = jax.random.fold_in(key, 7)
  probes = [dict(step=0, **probe(state, dataset))]
  steps_hist, active_hist, max_hist, replays = [], [], [], []
  seconds = 0.0
  done = 0
  while done < p.steps:
    chunk = min(p.probe_every, p.steps - done)
    state, hist = kronjax.fit(state, dataset, fit_key, batch_size=p.batch_size, steps=chunk,
                              progress=False)
    done += chunk
    steps_hist.append(hist["step"])
    active_hist.append(hist["active"])
    max_hist.append(hist["max_active"])
    replays += hist["replays"]
    seconds += hist["seconds"]
    probes.append(dict(step=int(state.step), **probe(state, dataset)))
  b = state.config.threshold  # the paper's sqrt(0.4 ln m)
  return {
      "m": m, "b": b, "expected_init": m * gaussian_tail(b), "bound_m45": m ** 0.8,
      "step": np.concatenate(steps_hist), "batch_active": np.concatenate(active_hist),
      "batch_max_active": np.concatenate(max_hist), "probes": probes, "replays": replays,
      "final_active_capacity": state.resolved_plan.active_capacity, "train_seconds": seconds,
  }


def plot(traces: list[dict], out_dir: pathlib.Path, name: str = "sparsity.png") -> str:
  plt = experiment.pyplot()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  for i, t in enumerate(traces):
    color = f"C{i}"
    m = t["m"]
    window = max(1, len(t["step"]) // 100)
    smooth = np.convolve(t["batch_active"], np.ones(window) / window, mode="valid")
    ax0.plot(t["step"][window - 1:], smooth / m, color=color, lw=1,
             label=f"m={m}: batch mean (smoothed)")
    pr = t["probes"]
    ax0.plot([q["step"] for q in pr], [q["active_max"] / m for q in pr], "^", color=color, ms=4,
             label=f"m={m}: max over all points")
    ax0.axhline(t["expected_init"] / m, color=color, ls="--", lw=0.8)
    ax0.axhline(t["bound_m45"] / m, color=color, ls=":", lw=0.8)
    ax1.plot([q["step"] for q in pr], [q["loss"] for q in pr], "o-", color=color, ms=3, label=f"m={m}")
  ax0.set(yscale="log", xlabel="step", ylabel="active neurons per point / m",
          title="Active fraction during training\n(dashed: Q(b) at init, dotted: m^(-1/5))")
  ax0.legend(fontsize=7)
  ax1.set(yscale="log", xlabel="step", ylabel="training loss (all points)", title="Training loss")
  ax1.legend(fontsize=8)
  for ax in (ax0, ax1):
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, name, dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  out_dir = pathlib.Path(out_dir)
  key = jax.random.PRNGKey(params.seed)
  kdata, kinit = jax.random.split(key)
  data, labels = kronjax.data.planted(kdata, params.n, dims=tuple(params.dims))
  dataset = kronjax.Dataset(data, labels)
  traces = []
  for m in params.widths:
    t = train_width(params, int(m), dataset, kinit, plan)
    traces.append(t)
    if progress:
      first, last = t["probes"][0], t["probes"][-1]
      print(f"sparsity: m={m:6d} active {first['active_mean']:.1f} -> {last['active_mean']:.1f} "
            f"(max {max(q['active_max'] for q in t['probes'])}), loss {first['loss']:.3g} -> "
            f"{last['loss']:.3g}, {t['train_seconds']:.1f} s", flush=True)
  plots = [plot(traces, out_dir)]
  table, per_width = [], []
  for t in traces:
    pr = t["probes"]
    row = {"m": t["m"], "b": t["b"], "m_Q_b": t["expected_init"], "m45": t["bound_m45"],
           "active_init": pr[0]["active_mean"], "active_final": pr[-1]["active_mean"],
           "active_max_any_point": max(q["active_max"] for q in pr),
           "final_over_init": pr[-1]["active_mean"] / pr[0]["active_mean"],
           "loss_init": pr[0]["loss"], "loss_final": pr[-1]["loss"], "replays": len(t["replays"])}
    table.append(row)
    per_width.append({**row, "probes": pr, "replays_detail": t["replays"],
                      "batch_active_every_step": t["batch_active"],
                      "train_seconds": t["train_seconds"]})
  metrics = {"widths": per_width, "steps": params.steps, "n": params.n,
             "batch_size": params.batch_size, "learning_rate": params.learning_rate}
  return {"metrics": metrics, "table": table, "plots": plots}
