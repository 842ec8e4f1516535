"""A vmapped learning-rate x threshold grid: final losses and time per step.

The grid is a ``kronjax.sweep`` (``kronjax.sweep.grid(threshold=..., learning_rate=...)``):
every member starts from the same network (seed 0, so the same ``W0`` and ``a``)
and sees the same batches; members differ only in the learning rate
(``optax.inject_hyperparams(optax.sgd)``, per member in the optimizer state) and
the ReLU threshold ``b``. Both are arrays in the state, so one ``jax.vmap`` of
``kronjax.train_step`` (``kronjax.sweep.train_step``, one dataset and Gram shared
by every member) trains the whole grid with one compilation. The static active capacity must
hold the *smallest* ``b``'s active sets, so every member pays for it; a member
that overflows is re-run with a doubled capacity (never silently skipped).

Time per step, two ways:
  * the vmapped sweep: median wall time of one step of the whole grid, divided
    by the number of members;
  * single runs: each (lr, b) cell trained alone with the capacity its own ``b``
    needs (``Config(threshold=b)`` under the automatic plan), median step time over
    ``timed_steps``.
    This is where ``b`` shows in the cost (fewer active neurons, smaller capacity).

Shapes: G grid members, m neurons, n points, n_e held-out points.

    kronjax run configs/sweep_grid.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax import sweep as kron_sweep
from kronjax.experiments import runner as experiment
from kronjax.experiments import timing as bench


@dataclasses.dataclass(frozen=True)
class Params:
  """The grid and the planted regression task it is trained on."""
  learning_rates: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
  thresholds: tuple[float, ...] = (0.75, 1.25, 1.75, 2.25, 2.75)
  width: int = 2048
  n: int = 512
  n_eval: int = 256
  dims: tuple[int, ...] = (32, 32)
  batch_size: int = 16
  steps: int = 400
  timed_steps: int = 20
  init: str = "implicit"
  seed: int = 0


def grid_sweep(config: kronjax.Config, dataset: kronjax.Dataset, p: "Params",
               plan: kronjax.Plan | None = None) -> kronjax.TrainState:
  """The stacked grid state, threshold-major: member ``i * len(lrs) + j`` has ``(b_i, lr_j)``."""
  members = kron_sweep.grid(threshold=[float(b) for b in p.thresholds],
                            learning_rate=[float(lr) for lr in p.learning_rates])
  return kron_sweep.init(config, dataset, members, plan=plan)


def batches_for(p: Params, count: int) -> list[jax.Array]:
  rng = np.random.default_rng(p.seed + 1)
  per_epoch = p.n // p.batch_size
  order = np.concatenate([rng.permutation(p.n)[:per_epoch * p.batch_size]
                          for _ in range(-(-count // per_epoch))])
  return [jnp.asarray(order[i * p.batch_size:(i + 1) * p.batch_size], jnp.int32) for i in range(count)]


def train_grid(p: Params, dataset: kronjax.Dataset, capacity: int, plan: kronjax.Plan):
  """Trains the grid for ``p.steps`` steps; returns (stacked state, timing, overflowed members)."""
  config = kronjax.Config(width=p.width, init=p.init)
  state = grid_sweep(config, dataset, p,
                     plan.replace(active_capacity=capacity, candidate_capacity=capacity))
  overflow = np.zeros(kron_sweep.size(state), bool)

  def counted(state, batch):
    state, metrics = kron_sweep.train_step(state, dataset, batch)
    nonlocal overflow
    overflow = overflow | np.asarray(metrics["overflow"])
    return state, metrics

  timing, state = bench.time_steps(counted, state, batches_for(p, p.steps), warmup=3)
  return state, timing, overflow


def single_run_ms(p: Params, dataset: kronjax.Dataset, key: jax.Array, b: float,
                  lr: float, plan: kronjax.Plan | None = None) -> tuple[float, bool]:
  """Median ms per step of one (lr, b) run alone, with the capacity its own ``b`` needs."""
  config = kronjax.Config(width=p.width, threshold=float(b), init=p.init)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=float(lr))
  state = kronjax.init(key, config, dataset, tx, plan=plan)
  seen = []

  def counted(state, batch):
    state, metrics = kronjax.jit_train_step(state, dataset, batch)
    seen.append(metrics["overflow"])
    return state, metrics

  timing, _ = bench.time_steps(counted, state, batches_for(p, p.timed_steps + 3), warmup=3)
  return 1e3 * timing["median_s"], bool(np.any(jax.device_get(seen)))


def heat_map(ax, values, lrs, bs, title, fmt, cmap, log=False):
  import matplotlib.colors as mcolors
  norm = None
  finite = values[np.isfinite(values)]
  if log and finite.size and finite.min() > 0:
    norm = mcolors.LogNorm(vmin=finite.min(), vmax=finite.max())
  im = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap, norm=norm, aspect="auto")
  ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
  ax.set_yticks(range(len(bs)), [f"{x:g}" for x in bs])
  ax.set(xlabel="learning rate", ylabel="threshold b", title=title)
  for i in range(len(bs)):
    for j in range(len(lrs)):
      v = values[i, j]
      dark = np.isfinite(v) and im.norm(v) < 0.5
      ax.text(j, i, "diverged" if not np.isfinite(v) else format(v, fmt), ha="center",
              va="center", fontsize=7, color="red" if not np.isfinite(v) else "white" if dark else "black")
  ax.figure.colorbar(im, ax=ax)


def plot(p: Params, res: dict, out_dir: pathlib.Path, name: str = "sweep_grid.png") -> str:
  plt = experiment.pyplot()
  lrs, bs = p.learning_rates, p.thresholds
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
  heat_map(axes[0], res["train_loss"], lrs, bs, "final training loss", ".3f", "viridis", log=True)
  heat_map(axes[1], res["eval_loss"], lrs, bs, "final held-out loss", ".3f", "viridis", log=True)
  heat_map(axes[2], res["single_ms"], lrs, bs,
           f"ms per step, single runs\n(vmapped grid: {res['vmapped_ms_per_member']:.3f} ms "
           f"per member-step)", ".2f", "magma")
  paper_b = kronjax.Config(width=p.width).resolve().threshold
  for ax in axes:
    ax.axhline(np.interp(paper_b, bs, range(len(bs))), color="white", ls="--", lw=1)
  fig.suptitle(f"lr x b grid, m={p.width}, n={p.n}, {p.steps} SGD steps of batch {p.batch_size} "
               f"(dashed: paper's b={paper_b:.2f})", fontsize=10)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, name, dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  out_dir = pathlib.Path(out_dir)
  p = params
  plan = kronjax.Plan() if plan is None else plan
  key = jax.random.PRNGKey(p.seed)
  kdata, kinit = jax.random.split(key)
  data, labels = kronjax.data.planted(kdata, p.n + p.n_eval, dims=tuple(p.dims))
  train_idx, eval_idx = jnp.arange(p.n), jnp.arange(p.n, p.n + p.n_eval)
  dataset = kronjax.Dataset(data.subset(train_idx), labels[:p.n], eval_data=data.subset(eval_idx),
                            eval_labels=labels[p.n:])
  nb, nl = len(p.thresholds), len(p.learning_rates)
  # The capacity the smallest b needs (as the plan derives it for that threshold), unless the
  # plan gives one.
  smallest_b = kronjax.Config(width=p.width, threshold=min(p.thresholds))
  capacity = plan.resolve(smallest_b).active_capacity
  attempts = []
  while True:
    state, timing, overflow = train_grid(p, dataset, capacity, plan)
    G = kron_sweep.size(state)
    attempts.append({"active_capacity": capacity, "overflowed_members": int(overflow.sum())})
    if progress:
      print(f"sweep_grid: {G} members, capacity {capacity}: "
            f"{1e3 * timing['median_s']:.2f} ms per grid step, {int(overflow.sum())} overflowed",
            flush=True)
    if not overflow.any() or capacity >= p.width:
      break
    capacity = min(p.width, 2 * capacity)
  evaluate = jax.jit(kronjax.evaluate)
  ev = jax.device_get([evaluate(kron_sweep.member(state, g), dataset) for g in range(G)])
  train_loss = np.asarray([e["train_loss"] for e in ev], float).reshape(nb, nl)
  eval_loss = np.asarray([e["eval_loss"] for e in ev], float).reshape(nb, nl)
  single = np.full((nb, nl), np.nan)
  single_overflow = np.zeros((nb, nl), bool)
  for i, b in enumerate(p.thresholds):
    for j, lr in enumerate(p.learning_rates):
      single[i, j], single_overflow[i, j] = single_run_ms(p, dataset, kinit, b, lr, plan)
    if progress:
      print(f"sweep_grid: b={b:g} single-run ms per step {np.round(single[i], 3)}", flush=True)
  res = {"train_loss": train_loss, "eval_loss": eval_loss, "single_ms": single,
         "vmapped_ms_per_member": 1e3 * timing["median_s"] / G}
  plots = [plot(p, res, out_dir)]
  table = []
  for i, b in enumerate(p.thresholds):
    for j, lr in enumerate(p.learning_rates):
      table.append({"b": b, "lr": lr, "train_loss": train_loss[i, j], "eval_loss": eval_loss[i, j],
                    "single_ms_per_step": single[i, j],
                    "vmapped_ms_per_member_step": res["vmapped_ms_per_member"]})
  finite = np.where(np.isfinite(eval_loss), eval_loss, np.inf)
  bi, li = np.unravel_index(np.argmin(finite), finite.shape)
  metrics = {
      "train_loss": train_loss, "eval_loss": eval_loss, "single_ms_per_step": single,
      "single_run_overflowed": single_overflow,
      "vmapped_ms_per_grid_step": 1e3 * timing["median_s"],
      "vmapped_ms_per_member_step": res["vmapped_ms_per_member"], "members": G,
      "vmapped_active_capacity": capacity, "attempts": attempts,
      "final_overflowed_members": attempts[-1]["overflowed_members"],
      "diverged": int((~np.isfinite(train_loss)).sum()),
      "best": {"b": p.thresholds[bi], "lr": p.learning_rates[li], "eval_loss": eval_loss[bi, li]},
      "paper_b": kronjax.Config(width=p.width).resolve().threshold,
  }
  return {"metrics": metrics, "table": table, "plots": plots,
          "timings": {"vmapped_grid_step": timing}}
