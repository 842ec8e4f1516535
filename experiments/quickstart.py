"""Quick start (`make demo`): width 4096 on planted-teacher data with d = 2**20, kronecker init, no W.

Trains ``kronjax`` from the kronecker init (``W0`` rows are sums of Kronecker
products; the ``m x d`` weights are never formed) on synthetic Kronecker data
from a planted teacher, with a held-out split in the dataset, and reports the table: steps, train and
held-out loss at the start and the end, active neurons per point, ms per step,
and what the dense network would cost: the memory of ``W`` (``m d`` floats) and
its step time, *measured* with the dense baseline at a smaller ``d`` and
extrapolated linearly in ``d`` (the dense step is ``O(m d B)``), next to a
FLOP-count estimate. Writes ``loss.png``; resumable (``kronjax run --resume``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import runner as xp
from kronjax.experiments import timing


@dataclasses.dataclass(frozen=True)
class Params:
  """Quick-start settings (see configs/quickstart.toml)."""
  seed: int = 0
  dims: tuple[int, ...] = (1024, 1024)   # d = prod(dims)
  n_train: int = 512
  n_eval: int = 256
  width: int = 4096
  lr: float = 32.0
  batch_size: int = 32
  epochs: int = 20
  init: str = "kronecker"
  noise: float = 0.03                    # planted: isotropic noise per factor
  latent_dim: int = 4
  teacher_width: int = 8
  eval_every: int = 16                   # steps between held-out evaluations
  checkpoint_every: int = 80             # steps between checkpoints (0: none)
  timing_steps: int = 20                 # steady-state steps timed with timing.time_steps
  dense_probe_dims: tuple[int, ...] = (128, 128)  # dense baseline measured here (empty: skip)
  dense_probe_repeats: int = 3

  def __post_init__(self):
    xp.require_positive(self, "n_train", "n_eval", "width", "batch_size", "epochs", "latent_dim",
                        "teacher_width")
    if self.batch_size > self.n_train:
      raise ValueError(f"batch_size must be <= n_train={self.n_train}, got {self.batch_size}.")
    if self.init not in ("kronecker", "implicit", "explicit"):
      raise ValueError(f"init must be 'kronecker', 'implicit' or 'explicit', got {self.init!r}.")
    if not self.dims or min(self.dims) < 1:
      raise ValueError(f"dims must be a non-empty list of positive ints, got {list(self.dims)}.")


def make_problem(p: Params, plan: kronjax.Plan | None = None):
  """Planted-teacher data split into train / held-out: ``(state, dataset, fit key)``."""
  key_data, key_init, key_fit = jax.random.split(jax.random.PRNGKey(p.seed), 3)
  data, labels = kronjax.data.planted(key_data, p.n_train + p.n_eval, p.dims, task="regression",
                                      noise=p.noise, latent_dim=p.latent_dim,
                                      teacher_width=p.teacher_width, dtype=jnp.float32)
  dataset = kronjax.Dataset(data.subset(jnp.arange(p.n_train)), labels[:p.n_train],
                            eval_data=data.subset(jnp.arange(p.n_train, p.n_train + p.n_eval)),
                            eval_labels=labels[p.n_train:])
  config = kronjax.Config(width=p.width, init=p.init)
  state = kronjax.init(key_init, config, dataset, optax.sgd(p.lr), plan=plan)
  return state, dataset, key_fit


def dense_probe(p: Params, steps_per_run: int) -> dict | None:
  """Dense baseline step time at ``prod(dense_probe_dims)``, same m, B; extrapolated to d."""
  if not p.dense_probe_dims:
    return None
  d_probe = math.prod(p.dense_probe_dims)
  config = kronjax.Config(width=p.width)
  tx = optax.sgd(p.lr)
  data, labels = kronjax.data.planted(jax.random.PRNGKey(p.seed + 1), p.batch_size,
                                      p.dense_probe_dims, noise=p.noise, dtype=jnp.float32)
  X = data.materialize()
  state = kronjax.dense.init(jax.random.PRNGKey(p.seed + 2), config, tuple(p.dense_probe_dims), tx,
                             dtype=jnp.float32)
  step = kronjax.dense.make_step(config, tx)
  probe, _ = timing.time_steps(lambda s, _: step(s, X, labels), state,
                               [None] * (2 + p.dense_probe_repeats), warmup=2)
  d = math.prod(p.dims)
  return {"d_probe": d_probe, "probe_step_s": probe["median_s"], "probe_timing": probe,
          "extrapolated_step_s": probe["median_s"] * d / d_probe}


def run(p: Params, out_dir: pathlib.Path, *, progress: bool, resume: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  t0 = time.perf_counter()
  state0, dataset, key_fit = make_problem(p, plan)
  timing.block(state0.P)
  init_s = time.perf_counter() - t0
  start = jax.device_get(kronjax.evaluate(state0, dataset))
  steps = p.epochs * (p.n_train // p.batch_size)
  # Resumable: with resume=True fit restores the newest checkpoint (and its history)
  # and ends where the uninterrupted run would have, bit for bit.
  state, hist = kronjax.fit(state0, dataset, key_fit, batch_size=p.batch_size, steps=steps,
                            progress=progress, eval_every=p.eval_every,
                            checkpoint_dir=out_dir / xp.CHECKPOINTS,
                            checkpoint_every=p.checkpoint_every, resume=resume)
  end = jax.device_get(kronjax.evaluate(state, dataset))

  # Steady-state step time, after training: the step fit runs (jitted, state donated).
  batches = [jnp.asarray(b) for b in kronjax.batch_schedule(key_fit, p.n_train, p.batch_size,
                                                             p.timing_steps + 3)]
  step_timing, _ = timing.time_steps(lambda s, b: kronjax.jit_train_step(s, dataset, b),
                                     state, batches, warmup=3)
  dense = dense_probe(p, steps)

  m, d, B = p.width, math.prod(p.dims), p.batch_size
  dense_bytes = m * d * 4
  dense_flops = 6 * m * d * B  # forward X W^T, grad of W, and the update: 2 + 2 + 2 m d B-ish
  metrics = {
      "steps": steps, "d": d, "width": m, "n_train": p.n_train, "n_eval": p.n_eval,
      "train_loss_start": float(start["train_loss"]), "train_loss_end": float(end["train_loss"]),
      "eval_loss_start": float(start["eval_loss"]), "eval_loss_end": float(end["eval_loss"]),
      "train_loss_ratio": float(start["train_loss"]) / float(end["train_loss"]),
      "active_mean": float(np.mean(hist["active"])), "active_max": int(np.max(hist["max_active"])),
      "active_expected_at_init": m * xp.gaussian_tail(state.config.threshold),
      "threshold": state.config.threshold, "replays": len(hist["replays"]),
      "dense_weight_bytes": dense_bytes, "dense_step_flops_estimate": dense_flops,
      "resumed_from_step": int(hist["resumed_from"]),
  }
  timings = {"init_s": init_s, "fit_s": hist["seconds"],
             "fit_ms_per_step": 1000 * hist["seconds"] / max(steps - hist["resumed_from"], 1),
             "step": step_timing}
  if dense is not None:
    metrics["dense_step_s_extrapolated"] = dense["extrapolated_step_s"]
    metrics["dense_probe_d"] = dense["d_probe"]
    timings["dense_probe_step"] = dense["probe_timing"]
  ms = 1000 * step_timing["median_s"]
  table = [
      {"quantity": "steps (epochs x n_train / batch)", "value": f"{steps} ({p.epochs} x {p.n_train} / {B})"},
      {"quantity": "d (input dimension)", "value": f"{d} = " + " x ".join(map(str, p.dims))},
      {"quantity": "width m / init", "value": f"{m} / {p.init}"},
      {"quantity": "train loss start -> end", "value": f"{_num(metrics['train_loss_start'])} -> "
                                                        f"{_num(metrics['train_loss_end'])} "
                                                        f"({_ratio(metrics['train_loss_ratio'])} lower)"},
      {"quantity": "held-out loss start -> end", "value": f"{_num(metrics['eval_loss_start'])} -> "
                                                           f"{_num(metrics['eval_loss_end'])}"},
      {"quantity": "active neurons per point (mean / max)",
       "value": f"{metrics['active_mean']:.1f} / {metrics['active_max']} of {m}"},
      {"quantity": "kronjax ms per step (median, steady state)",
       "value": f"{ms:.1f} (p10 {1000 * step_timing['p10_s']:.1f}, p90 {1000 * step_timing['p90_s']:.1f})"},
      {"quantity": "kronjax ms per step (fit loop, incl. eval + checkpoints)",
       "value": f"{timings['fit_ms_per_step']:.1f}"},
      {"quantity": "dense W memory (m*d*4 bytes)", "value": f"{_bytes(dense_bytes)} (not allocated)"},
      {"quantity": "dense step FLOPs (estimate, ~6*m*d*B)", "value": f"{dense_flops:.2e}"},
  ]
  if dense is not None:
    table.append({"quantity": f"dense ms per step (measured at d={dense['d_probe']}, "
                              f"x{d // dense['d_probe']} linear extrapolation)",
                  "value": f"{1000 * dense['extrapolated_step_s']:.0f} (measured "
                           f"{1000 * dense['probe_step_s']:.1f} at d={dense['d_probe']}); "
                           f"~{dense['extrapolated_step_s'] / step_timing['median_s']:.0f}x kronjax"})
  plots = [_plot(out_dir, hist, p, start)]
  return {"metrics": metrics, "table": table, "plots": plots, "timings": timings}


def _plot(out_dir: pathlib.Path, hist: dict, p: Params, start: dict) -> str:
  plt = xp.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  steps, loss = np.asarray(hist["step"]), np.asarray(hist["loss"])
  ax.plot(steps, loss, lw=0.6, alpha=0.35, color="C0", label="batch loss")
  if len(loss) >= 8:
    w = max(len(loss) // 40, 4)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1:], smooth, color="C0", lw=1.2, label=f"batch loss ({w}-step mean)")
  if "eval_step" in hist and len(hist["eval_step"]):
    at = np.concatenate([[0], hist["eval_step"]])
    ax.plot(at, np.concatenate([[start["train_loss"]], hist["train_loss"]]), "o-", ms=3, color="C1",
            label="train loss (all points)")
    ax.plot(at, np.concatenate([[start["eval_loss"]], hist["eval_loss"]]), "s-", ms=3, color="C2",
            label="held-out loss")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (1/2 squared error)")
  ax.set_title(f"kronjax, m={p.width}, d={math.prod(p.dims)} ({p.init} init)", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  return xp.save_figure(fig, out_dir, "loss.png")


def _num(v: float) -> str:
  """A loss for the results table: 4 decimals, or scientific notation below 1e-3 (never 0.0000)."""
  return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def _ratio(r: float) -> str:
  """``start / end`` as ``15.8x``, or ``6.552e+05x`` when large."""
  return f"{r:.3e}x" if abs(r) >= 1e4 else f"{r:.1f}x"


def _bytes(n: int) -> str:
  return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
