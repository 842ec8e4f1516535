"""The kronecker init's law: firing rate and tails at init, and training against the Gaussian init.

The kronecker init (``Config(init="kronecker", init_rank=R)``, the default) draws
each neuron's ``W0`` row as ``(1/sqrt(R)) sum_{s<R} g^(1) ⊗ ... ⊗ g^(p)`` with
Gaussian factors. ``<w, x>`` then has mean 0 and the Gaussian init's covariance,
but not its law: for a unit rank-1 ``x`` it is a normalized sum of ``R``
products of ``p`` independent ``N(0, 1)``, with excess kurtosis ``(3^p - 3) / R``.
The threshold ``b = sqrt(0.4 ln m)`` and the capacities assume the Gaussian tail
``Q(b)``, so the question is how far the firing rate moves, and whether training
notices. Two parts:

(a) **Init law.** For ``p = 2`` and ``3`` factors, every ``init_rank`` ``R`` in
``ranks`` and every width ``m`` in ``widths`` (so ``b`` grows with ``m``): the
mean number of active neurons per unit-norm rank-1 point (``kronjax.data.synthetic``)
over ``m Q(b)`` (1 for the Gaussian law), its standard error over points, the
largest count over points against the plan's ``active_capacity``, and the pooled
excess kurtosis of ``<w_r, x_i>`` over neurons and points against
``(3^p - 3) / R``. The explicit Gaussian init (``d`` kept small so it is cheap)
is the reference measured the same way.

(b) **Training.** On the planted task (``kronjax.data.planted``, mse; ``p = 3``
by default, where (a) shows the largest departure) and on real digit pairs
(``experiments/digit_pairs.py``'s data path: scikit-learn's digits, disjoint
train/test images, softmax over "same digit?", ``p = 2``), ``kronjax.fit`` from
the explicit init and from the kronecker init at each of ``train_ranks``, each
from ``init_seeds`` init keys shared by all inits (key ``s``: the same output
layer ``a``, another ``W0`` law), with the same batches (one fit key) and the
same evaluation steps: full training loss and held-out loss (and accuracy for
the digits), averaged over the keys, and each kronecker run's paired difference
from the explicit run with its key. The spread of the explicit runs over keys is
what one more Gaussian draw changes: the yardstick for the kronecker curves.

Shapes: m neurons, n points, p factors, R the init rank, d the input dimension.

    kronjax run configs/init_law.toml [--smoke]
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


@dataclasses.dataclass(frozen=True)
class Params:
  """init_law settings (see configs/init_law.toml)."""
  seed: int = 0
  # (a) the law at init
  widths: tuple[int, ...] = (1024, 4096, 16384, 65536)
  ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
  law_points: int = 256
  dims_p2: tuple[int, ...] = (64, 64)
  dims_p3: tuple[int, ...] = (16, 16, 16)
  # (b) training: kronecker at train_ranks against explicit
  train_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
  init_seeds: int = 4
  eval_every: int = 16
  planted_dims: tuple[int, ...] = (16, 16, 16)
  planted_train: int = 512
  planted_eval: int = 256
  planted_width: int = 4096
  planted_lr: float = 16.0
  planted_batch_size: int = 16
  planted_epochs: int = 20
  planted_noise: float = 0.1
  digits_train: int = 2048
  digits_test: int = 1024
  digits_width: int = 4096
  digits_lr: float = 128.0
  digits_batch_size: int = 32
  digits_epochs: int = 5

  def __post_init__(self):
    xp.require_positive(self, "law_points", "init_seeds", "eval_every", "planted_train",
                        "planted_eval", "planted_width", "planted_batch_size", "planted_epochs",
                        "digits_train", "digits_test", "digits_width", "digits_batch_size",
                        "digits_epochs")
    for name in ("widths", "ranks", "train_ranks"):
      values = getattr(self, name)
      if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}.")
    if len(self.dims_p2) != 2 or len(self.dims_p3) != 3:
      raise ValueError(f"dims_p2 needs 2 factor sizes and dims_p3 3, got {self.dims_p2!r} and "
                       f"{self.dims_p3!r}.")
    if self.planted_batch_size > self.planted_train or self.digits_batch_size > self.digits_train:
      raise ValueError("a batch size is larger than its training set.")


# ----------------------------------------------------------------------------- (a) the law


def excess_kurtosis_theory(p: int, rank: int | None) -> float:
  """``(3^p - 3) / R`` for the kronecker init (0 for the Gaussian: ``rank=None``)."""
  return 0.0 if rank is None else (3.0 ** p - 3.0) / rank


def law_point(key, data: kronjax.KronData, p: int, m: int, rank: int | None,
              plan: kronjax.Plan | None = None) -> dict:
  """Active counts and the pooled kurtosis of ``P0`` for one (p, m, init)."""
  n = data.n
  dataset = kronjax.Dataset(data, jnp.zeros((n, 1), data.dtype))
  config = (kronjax.Config(width=m, init="explicit") if rank is None
            else kronjax.Config(width=m, init="kronecker", init_rank=rank))
  state = kronjax.init(key, config, dataset, optax.sgd(1.0), plan=plan)
  P = np.asarray(jax.device_get(state.P), np.float64)  # (m, n)
  b = state.config.threshold
  capacity = state.resolved_plan.active_capacity
  counts = (P > b).sum(axis=0)
  q = config.firing_probability
  second, fourth = np.mean(P ** 2), np.mean(P ** 4)
  return {
      "p": p, "m": m, "init": config.init, "init_rank": rank, "b": b, "Q_b": q,
      "active_mean": float(counts.mean()), "m_Q_b": m * q,
      "ratio": float(counts.mean() / (m * q)),
      "ratio_se": float(counts.std(ddof=1) / math.sqrt(n) / (m * q)),
      "active_max": int(counts.max()), "active_capacity": capacity,
      "points_over_capacity": int((counts > capacity).sum()),
      "second_moment": float(second),
      "excess_kurtosis": float(fourth / second ** 2 - 3.0),
      "excess_kurtosis_theory": excess_kurtosis_theory(p, rank),
  }


def run_law(p_: Params, key, progress: bool, plan: kronjax.Plan | None = None) -> list[dict]:
  k_data, k_init = jax.random.split(key)
  rows = []
  for p, dims in ((2, p_.dims_p2), (3, p_.dims_p3)):
    data = kronjax.data.synthetic(jax.random.fold_in(k_data, p), p_.law_points, dims,
                                  dtype=jnp.float32)  # rank 1, unit norm
    for m in p_.widths:
      for rank in tuple(p_.ranks) + (None,):
        row = law_point(k_init, data, p, int(m), rank, plan)
        row["d"] = math.prod(dims)
        rows.append(row)
        if progress:
          print(f"init_law: p={p} m={m} {row['init']} R={rank}: active/(m Q(b)) = "
                f"{row['ratio']:.3f} ± {row['ratio_se']:.3f}, excess kurtosis "
                f"{row['excess_kurtosis']:.2f} (theory {row['excess_kurtosis_theory']:.2f})",
                flush=True)
  return rows


# ----------------------------------------------------------------------------- (b) training


def planted_dataset(p_: Params, key) -> kronjax.Dataset:
  n, n_e = p_.planted_train, p_.planted_eval
  data, labels = kronjax.data.planted(key, n + n_e, p_.planted_dims, noise=p_.planted_noise,
                                      dtype=jnp.float32)
  return kronjax.Dataset(data.subset(jnp.arange(n)), labels[:n],
                         eval_data=data.subset(jnp.arange(n, n + n_e)), eval_labels=labels[n:])


def digits_dataset(p_: Params) -> kronjax.Dataset:
  """Same-digit pairs built exactly as ``experiments/digit_pairs.py`` builds them (d = 64**2)."""
  dp = xp.import_experiment("digit_pairs", pathlib.Path(__file__).resolve().parent)
  dpp = dp.Params(images_per_input=2, train_inputs=p_.digits_train, test_inputs=p_.digits_test,
                  seed=p_.seed)
  rng = np.random.default_rng(dpp.seed)
  (img_tr, lab_tr), (img_te, lab_te), _ = dp.load_images(dpp, rng)
  idx_tr, y_tr = dp.sample_inputs(lab_tr, dpp.train_inputs, 2, dpp.same_fraction, rng)
  idx_te, y_te = dp.sample_inputs(lab_te, dpp.test_inputs, 2, dpp.same_fraction, rng)
  train = kronjax.KronData(tuple(jnp.asarray(img_tr[idx_tr[:, q]]) for q in range(2)))
  test = kronjax.KronData(tuple(jnp.asarray(img_te[idx_te[:, q]]) for q in range(2)))
  return kronjax.Dataset(train, y_tr, eval_data=test, eval_labels=y_te)


def train_runs(p_: Params, dataset: kronjax.Dataset, *, width: int, lr: float, batch_size: int,
               epochs: int, loss: str, k_init, k_fit, progress: bool, task: str,
               plan: kronjax.Plan | None = None) -> dict:
  """``kronjax.fit`` from each init and init key: same batches and eval steps for all.

  Init key ``s`` is ``k_init`` for ``s = 0``, else ``fold_in(k_init, s)``; every init
  uses the same keys, so runs with the same key share the output layer ``a`` and
  differ only in ``W0``'s law.
  """
  steps = epochs * (dataset.n // batch_size)
  extra = {"loss": loss, "num_classes": 2} if loss == "softmax" else {}
  metrics = ("train_loss", "eval_loss") + (("train_accuracy", "eval_accuracy")
                                           if loss == "softmax" else ())
  runs = {}
  for rank in (None,) + tuple(p_.train_ranks):
    name = "explicit" if rank is None else f"kronecker_R{rank}"
    config = (kronjax.Config(width=width, init="explicit", **extra) if rank is None
              else kronjax.Config(width=width, init="kronecker", init_rank=rank, **extra))
    seeds = []
    for seed in range(p_.init_seeds):
      key = k_init if seed == 0 else jax.random.fold_in(k_init, seed)
      state = kronjax.init(key, config, dataset, optax.sgd(lr), plan=plan)
      start = jax.device_get(kronjax.evaluate(state, dataset))
      state, hist = kronjax.fit(state, dataset, k_fit, batch_size=batch_size, steps=steps,
                                progress=progress, eval_every=p_.eval_every)
      curve = {k: [float(start[k])] + [float(v) for v in hist[k]] for k in metrics}
      curve.update(fit_s=float(hist["seconds"]), replays=len(hist["replays"]),
                   stopped=hist["stopped"])
      seeds.append(curve)
    run = {"init": config.init, "init_rank": rank, "steps": steps,
           "eval_step": [0] + [int(s) for s in hist["eval_step"]], "seeds": seeds}
    for k in metrics:
      arr = np.asarray([c[k] for c in seeds])
      run[f"{k}_mean"] = arr.mean(0).tolist()
      run[f"final_{k}"] = arr[:, -1].tolist()
    run["fit_s"] = float(np.median([c["fit_s"] for c in seeds]))
    run["replays"] = int(sum(c["replays"] for c in seeds))
    runs[name] = run
    if progress:
      print(f"init_law: {task} {name}: " + ", ".join(
          f"{k} {np.mean(run['final_' + k]):.4g} ± {np.std(run['final_' + k], ddof=1) if len(seeds) > 1 else 0:.2g}"
          for k in metrics if k != "train_accuracy") + f" ({run['fit_s']:.1f} s per fit)", flush=True)
  return runs


def summarize_runs(runs: dict) -> dict:
  """Per init: mean and std over init keys of the final metrics, and the mean paired
  difference from the explicit run with the same key (with its standard error)."""
  ref = runs["explicit"]
  out = {}
  for name, r in runs.items():
    row = {}
    for k in ("train_loss", "eval_loss", "eval_accuracy"):
      if f"final_{k}" not in r:
        continue
      v = np.asarray(r[f"final_{k}"])
      diff = v - np.asarray(ref[f"final_{k}"])
      row[f"{k}_mean"] = float(v.mean())
      row[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
      row[f"{k}_minus_explicit_mean"] = float(diff.mean())
      row[f"{k}_minus_explicit_se"] = (float(diff.std(ddof=1) / math.sqrt(len(v)))
                                       if len(v) > 1 else 0.0)
    out[name] = row
  return out


# ----------------------------------------------------------------------------- plot


def plot(out_dir: pathlib.Path, law: list[dict], planted: dict, digits: dict, p_: Params) -> str:
  plt = xp.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
  ax = axes[0]
  ranks = list(p_.ranks)
  gauss_x = 2 * max(ranks)  # where the Gaussian (explicit) reference sits on the R axis
  for i, m in enumerate(p_.widths):
    for p, ls, mk in ((2, "-", "o"), (3, "--", "s")):
      rows = [r for r in law if r["p"] == p and r["m"] == m]
      kr = [r for r in rows if r["init"] == "kronecker"]
      ex = [r for r in rows if r["init"] == "explicit"][0]
      ax.errorbar([r["init_rank"] for r in kr], [r["ratio"] for r in kr],
                  yerr=[r["ratio_se"] for r in kr], color=f"C{i}", ls=ls, marker=mk, ms=4, lw=1,
                  capsize=2, label=f"m={m} (b={ex['b']:.2f})" if p == 2 else None)
      ax.errorbar([gauss_x], [ex["ratio"]], yerr=[ex["ratio_se"]], color=f"C{i}", marker=mk,
                  ms=5, mfc="none", capsize=2)
  ax.axhline(1.0, color="k", lw=0.8, ls=":")
  big = max(p_.widths)
  for p, ls in ((2, "-"), (3, "--")):
    kurt = ", ".join(f"{r['excess_kurtosis']:.2g}" for r in law
                     if r["p"] == p and r["m"] == big and r["init"] == "kronecker")
    ax.plot([], [], color="gray", ls=ls,
            label=f"p={p}: excess kurtosis {3 ** p - 3}/R\n  measured (m={big}): {kurt}")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ranks + [gauss_x])
  ax.set_xticklabels([str(r) for r in ranks] + ["Gauss\n(explicit)"])
  ax.set(xlabel="init_rank R", ylabel="mean active per point / (m Q(b))",
         title="(a) firing rate at init, rank-1 unit points")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.27), ncol=2)
  ax.grid(alpha=0.3, which="both")

  def curves(ax, runs, title, ylabel, acc):
    n_seeds = len(runs["explicit"]["seeds"])
    steps = runs["explicit"]["eval_step"]
    if n_seeds > 1:
      for key, alpha in (("eval_loss", 0.25), ("train_loss", 0.12)):
        arr = np.asarray([s[key] for s in runs["explicit"]["seeds"]])
        ax.fill_between(steps, arr.min(0), arr.max(0), color="k", alpha=alpha, lw=0)
    cmap = plt.get_cmap("viridis")
    ranks = [r["init_rank"] for r in runs.values() if r["init_rank"] is not None]
    for name, r in runs.items():
      if r["init_rank"] is None:
        color, label = "k", "explicit (Gaussian)"
      else:
        color = cmap(0.85 * ranks.index(r["init_rank"]) / max(1, len(ranks) - 1))
        label = f"kronecker R={r['init_rank']}"
      key = "eval_accuracy" if acc else "eval_loss"
      v = np.asarray(r[f"final_{key}"])
      label += f": held-out {'acc' if acc else 'loss'} {v.mean():.3g}"
      if n_seeds > 1:
        label += f" ± {v.std(ddof=1):.1g}"
      ax.plot(steps, r["eval_loss_mean"], color=color, lw=1.3, label=label)
      ax.plot(steps, r["train_loss_mean"], color=color, lw=0.9, ls="--")
    ax.plot([], [], color="gray", ls="--", label="dashed: full train loss")
    if n_seeds > 1:
      ax.fill_between([], [], [], color="k", alpha=0.25, label="explicit: range over init keys")
    ax.set(yscale="log", xlabel="step", ylabel=ylabel,
           title=title + (f"\nmean of {n_seeds} init keys (± std)" if n_seeds > 1 else ""))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax.grid(alpha=0.3, which="both")

  curves(axes[1], planted, f"(b) planted task, p={len(p_.planted_dims)}, "
         f"d={math.prod(p_.planted_dims)}, m={p_.planted_width}, n={p_.planted_train}", "held-out loss (solid), 1/2 squared error", acc=False)
  curves(axes[2], digits, f"(b) digit pairs, p=2, d=4096, m={p_.digits_width}, n={p_.digits_train}",
         "held-out cross-entropy (solid)", acc=True)
  fig.suptitle("kronecker init (sum of R Kronecker products) vs Gaussian init: same key, same "
               "batches", fontsize=10)
  fig.tight_layout()
  return xp.save_figure(fig, out_dir, "init_law.png", dpi=80)


def replot(out_dir: str | pathlib.Path) -> str:
  """Redraws ``init_law.png`` from the ``results.json`` in ``out_dir`` (no rerun)."""
  import json  # pylint: disable=g-import-not-at-top
  out_dir = pathlib.Path(out_dir)
  saved = json.loads((out_dir / "results.json").read_text())
  fields = {f.name: f.type for f in dataclasses.fields(Params)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"]["params"].items()
            if k in fields}
  m = saved["metrics"]
  return plot(out_dir, m["law"], m["planted"]["curves"], m["digits"]["curves"], Params(**values))


# ----------------------------------------------------------------------------- run


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  p_ = params
  out_dir = pathlib.Path(out_dir)
  key = jax.random.PRNGKey(p_.seed)
  k_law, k_planted, k_init, k_fit = jax.random.split(key, 4)
  timings = {}
  t0 = time.perf_counter()
  law = run_law(p_, k_law, progress, plan)
  timings["law_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  planted = train_runs(p_, planted_dataset(p_, k_planted), width=p_.planted_width,
                       lr=p_.planted_lr, batch_size=p_.planted_batch_size,
                       epochs=p_.planted_epochs, loss="mse", k_init=k_init, k_fit=k_fit,
                       progress=progress, task="planted", plan=plan)
  timings["planted_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  digits = train_runs(p_, digits_dataset(p_), width=p_.digits_width, lr=p_.digits_lr,
                      batch_size=p_.digits_batch_size, epochs=p_.digits_epochs, loss="softmax",
                      k_init=k_init, k_fit=k_fit, progress=progress, task="digits", plan=plan)
  timings["digits_s"] = time.perf_counter() - t0

  big = max(p_.widths)
  table = []
  for r in law:
    if r["m"] == big:
      table.append({"part": f"init law, m={big}", "p": r["p"],
                    "init": "explicit" if r["init"] == "explicit" else f"kronecker R={r['init_rank']}",
                    "active/(m Q(b))": round(r["ratio"], 4), "± se": round(r["ratio_se"], 4),
                    "max active / capacity": f"{r['active_max']}/{r['active_capacity']}",
                    "excess kurtosis": round(r["excess_kurtosis"], 3),
                    "theory": round(r["excess_kurtosis_theory"], 3)})
  for task, runs in (("planted", planted), ("digits", digits)):
    summary = summarize_runs(runs)
    for name, r in runs.items():
      sm = summary[name]
      row = {"part": f"training, {task}", "init": name}
      for k, label in (("train_loss", "train loss"), ("eval_loss", "held-out loss"),
                       ("eval_accuracy", "held-out acc")):
        if f"{k}_mean" in sm:
          row[label] = f"{sm[k + '_mean']:.4g} ± {sm[k + '_std']:.2g}"
          if name != "explicit":
            row[label] += (f" ({sm[k + '_minus_explicit_mean']:+.2g} ± "
                           f"{sm[k + '_minus_explicit_se']:.1g} vs explicit)")
      row["replays"] = r["replays"]
      row["fit s"] = round(r["fit_s"], 2)
      table.append(row)

  metrics = {
      "law": law,
      "law_max_ratio_deviation": {
          f"p{p}_R{r}": max(abs(x["ratio"] - 1) for x in law if x["p"] == p and x["init_rank"] == r
                            and x["init"] == "kronecker")
          for p in (2, 3) for r in p_.ranks},
      "law_explicit_max_ratio_deviation": max(abs(x["ratio"] - 1) for x in law
                                              if x["init"] == "explicit"),
      "law_points_over_capacity": sum(x["points_over_capacity"] for x in law),
      "planted": {"summary": summarize_runs(planted), "curves": planted,
                  "d": math.prod(p_.planted_dims)},
      "digits": {"summary": summarize_runs(digits), "curves": digits, "d": 64 ** 2},
  }
  plots = [plot(out_dir, law, planted, digits, p_)]
  return {"metrics": metrics, "table": table, "plots": plots, "timings": timings}
