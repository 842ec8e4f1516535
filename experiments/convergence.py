"""Training and held-out loss curves: kronjax (explicit, implicit and kronecker init) over the dense baseline.

All four runs see the same data, labels, learning rate and batch sequence
(``kronjax.batch_schedule``: the dense baseline replays ``kronjax.fit``'s batches). The dense baseline starts from ``W0`` drawn
from the same key as kronjax's explicit init, so the explicit curve must lie on
the dense one (kronjax computes the dense step exactly; only float rounding
differs): the run reports the max abs difference of the batch losses and of
the full train / held-out losses. The implicit init samples ``P0 ~ N(0, K)``
(the same distribution, not the same draw), so its curve is another sample of
the same training dynamics. The kronecker init (the default) draws every row
of ``W0`` as a sum of Kronecker products: the same covariance, another law; its
curve shows what the d-free init costs or gains in training. Writes
``convergence.png``.
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


INITS = ("explicit", "implicit", "kronecker")
"""Gaussian W0 drawn in d dimensions (the dense baseline starts from it), P0 ~ N(0, K),
and the d-free kronecker W0 (Config's default rank)."""


@dataclasses.dataclass(frozen=True)
class Params:
  """convergence settings (see configs/convergence.toml)."""
  seed: int = 0
  dims: tuple[int, ...] = (32, 32)
  n_train: int = 256
  n_eval: int = 128
  width: int = 1024
  lr: float = 16.0
  batch_size: int = 16
  epochs: int = 30
  eval_every: int = 16
  noise: float = 0.1
  dtype: str = "float32"

  def __post_init__(self):
    xp.require_positive(self, "n_train", "n_eval", "width", "batch_size", "epochs", "eval_every")
    if self.batch_size > self.n_train:
      raise ValueError(f"batch_size must be <= n_train={self.n_train}, got {self.batch_size}.")
    if self.dtype not in ("float32", "float64"):
      raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")


def run(p: Params, out_dir: pathlib.Path, *, progress: bool,
        plan: kronjax.Plan | None = None) -> dict:
  if p.dtype == "float64":
    with jax.enable_x64(True):
      return _run(p, out_dir, progress=progress, plan=plan)
  return _run(p, out_dir, progress=progress, plan=plan)


def _run(p: Params, out_dir: pathlib.Path, *, progress: bool,
         plan: kronjax.Plan | None = None) -> dict:
  dtype = jnp.dtype(p.dtype)
  k_data, k_init, k_fit = jax.random.split(jax.random.PRNGKey(p.seed), 3)
  data, labels = kronjax.data.planted(k_data, p.n_train + p.n_eval, p.dims, noise=p.noise, dtype=dtype)
  dataset = kronjax.Dataset(data.subset(jnp.arange(p.n_train)), labels[:p.n_train],
                            eval_data=data.subset(jnp.arange(p.n_train, p.n_train + p.n_eval)),
                            eval_labels=labels[p.n_train:])
  tx = optax.sgd(p.lr)
  steps = p.epochs * (p.n_train // p.batch_size)

  runs, seconds = {}, {}
  for init in INITS:
    config = kronjax.Config(width=p.width, init=init)
    state = kronjax.init(k_init, config, dataset, tx, plan=plan)
    start = jax.device_get(kronjax.evaluate(state, dataset))
    state, hist = kronjax.fit(state, dataset, k_fit, batch_size=p.batch_size, steps=steps,
                              progress=progress, eval_every=p.eval_every)
    runs[init] = _curves(hist, start)
    seconds[f"kronjax_{init}_fit_s"] = hist["seconds"]

  dense, seconds["dense_fit_s"] = _dense_run(p, k_init, k_fit, dataset, tx, steps, progress)
  runs["dense"] = dense

  exp, den = runs["explicit"], runs["dense"]
  diff = {k: float(np.max(np.abs(exp[k] - den[k]))) for k in ("batch_loss", "train_loss", "eval_loss")}
  metrics = {
      "steps": steps, "d": math.prod(p.dims), "width": p.width, "dtype": p.dtype,
      "max_abs_diff_explicit_vs_dense": diff,
      "max_abs_diff_explicit_vs_dense_all": max(diff.values()),
      "final": {name: {"train_loss": float(r["train_loss"][-1]), "eval_loss": float(r["eval_loss"][-1])}
                for name, r in runs.items()},
      "start": {name: {"train_loss": float(r["train_loss"][0]), "eval_loss": float(r["eval_loss"][0])}
                for name, r in runs.items()},
      "curves": {name: {k: v.tolist() for k, v in r.items()} for name, r in runs.items()},
  }
  table = []
  for name in ("dense",) + INITS:
    r = runs[name]
    table.append({
        "run": "dense baseline" if name == "dense" else f"kronjax {name} init",
        "train loss start": float(r["train_loss"][0]), "train loss end": float(r["train_loss"][-1]),
        "held-out start": float(r["eval_loss"][0]), "held-out end": float(r["eval_loss"][-1]),
        "max |diff| vs dense": None if name == "dense" else max(
            float(np.max(np.abs(r[k] - den[k]))) for k in ("batch_loss", "train_loss", "eval_loss")),
        "fit s": seconds[f"{'dense' if name == 'dense' else 'kronjax_' + name}_fit_s"],
    })
  plots = [_plot(out_dir, runs, p, diff)]
  return {"metrics": metrics, "table": table, "plots": plots, "timings": seconds}


def _curves(hist: dict, start: dict) -> dict[str, np.ndarray]:
  """Batch loss per step, and full train / held-out loss at step 0 and every eval step."""
  return {"step": np.asarray(hist["step"]), "batch_loss": np.asarray(hist["loss"], np.float64),
          "eval_step": np.concatenate([[0], hist["eval_step"]]),
          "train_loss": np.concatenate([[float(start["train_loss"])], hist["train_loss"]]),
          "eval_loss": np.concatenate([[float(start["eval_loss"])], hist["eval_loss"]])}


def _dense_run(p, k_init, k_fit, dataset, tx, steps, progress):
  """The dense baseline on the same W0, batches and evaluation steps as ``kronjax.fit``."""
  config = kronjax.Config(width=p.width, init="explicit")  # the Gaussian W0 the explicit run draws
  X, X_held = dataset.data.materialize(), dataset.eval_data.materialize()
  y, y_held = dataset.labels, dataset.eval_labels
  state = kronjax.dense.init(k_init, config, dataset.data.dims, tx, dtype=X.dtype)
  step = kronjax.dense.make_step(config, tx)
  evaluate = jax.jit(lambda s, X_, y_: kronjax.dense.evaluate(s, config, X_, y_)["loss"])
  batches = kronjax.batch_schedule(k_fit, p.n_train, p.batch_size, steps)
  hist = {"step": [], "loss": [], "eval_step": [], "train_loss": [], "eval_loss": []}
  start = {"train_loss": evaluate(state, X, y), "eval_loss": evaluate(state, X_held, y_held)}
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=steps, desc="dense baseline", unit="step")
  t0 = time.perf_counter()
  for t, b in enumerate(batches, start=1):
    state, m = step(state, X[b], y[b])
    hist["step"].append(t)
    hist["loss"].append(float(m["loss"]))
    if t % p.eval_every == 0 or t == steps:
      hist["eval_step"].append(t)
      hist["train_loss"].append(float(evaluate(state, X, y)))
      hist["eval_loss"].append(float(evaluate(state, X_held, y_held)))
    if bar is not None:
      bar.update(1)
  seconds = time.perf_counter() - t0
  if bar is not None:
    bar.close()
  return _curves({k: np.asarray(v) for k, v in hist.items()}, start), seconds


def _plot(out_dir: pathlib.Path, runs: dict, p: Params, diff: dict) -> str:
  plt = xp.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  styles = {"dense": dict(color="k", lw=2.5, alpha=0.45, label="dense baseline"),
            "explicit": dict(color="C0", lw=1.0, ls="--", marker="o", ms=2.5,
                             label="kronjax, explicit init"),
            "implicit": dict(color="C1", lw=1.0, label="kronjax, implicit init (N(0, K))"),
            "kronecker": dict(color="C2", lw=1.0, label="kronjax, kronecker init (default)")}
  for ax, key, title in ((axes[0], "train_loss", "training loss (all points)"),
                         (axes[1], "eval_loss", "held-out loss")):
    for name in ("dense",) + INITS:
      ax.plot(runs[name]["eval_step"], runs[name][key], **styles[name])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("loss (1/2 squared error)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"m={p.width}, d={math.prod(p.dims)}, n={p.n_train}, lr={p.lr:g}, B={p.batch_size}, "
               f"{p.dtype}; max |explicit - dense| = {max(diff.values()):.1e}", fontsize=9)
  return xp.save_figure(fig, out_dir, "convergence.png")
