"""kronjax option by option on pairwise data: the sweeps, the choice on validation, the threshold
curve.

Shapes: N pairs in all (train, validation and test are index sets into them), m neurons.

An ablation trains one vmapped ``kronjax.sweep`` per ``Variant`` (a static setting: the start,
an output bias, a weight-decay axis) over its learning rates and thresholds, and scores every
member on the validation and the test pairs after every epoch with the given metric functions.
The network trains by sgd, its learning rate constant or decaying linearly to 0 over the run
(``Grid.schedule``).
Each option's row is the (member, epoch) with the best validation score of the first metric;
test scores are recorded beside it and never used to choose. The options
(``option_runs``):

* the defaults (kronecker init, ``b = sqrt(0.4 ln m)``) and ``b = 0``, labels centered on the
  training mean;
* ``b = 0`` with the mirrored start (``Config(centered=True)``), and the threshold curve: every
  ``b`` of the grid with the mirrored start;
* at the best ``b`` and learning rate of the curve: weight decay (``optax.add_decayed_weights``),
  and an output bias (``Config(output_bias=True)``) on the raw labels with its own learning
  rates (a member each).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
import optax

import kronjax
from kronjax.experiments import kronrls
from kronjax.experiments import runner as experiment

SCHEDULES = ("constant", "linear")
"""``Grid.schedule``: the network's learning rate kept, or decayed linearly to 0 over the run
(the noise of small batches then settles at the end instead of holding the error at its
floor)."""

Metric = Callable[[np.ndarray, np.ndarray], float]
"""``(y_true (k,), y_pred (k,)) -> score``, lower is better for the first metric of a run."""


@dataclasses.dataclass(frozen=True)
class Grid:
  """The network and the search grids every variant draws from."""
  width: int
  learning_rates: tuple[float, ...]
  thresholds: tuple[float, ...]
  weight_decays: tuple[float, ...]
  bias_learning_rates: tuple[float, ...]   # the output bias's own, one member each
  batch_size: int
  epochs: int
  seed: int = 0
  schedule: str = "constant"   # "linear": the network's rate decays to 0 over the run

  def __post_init__(self):
    for name in ("learning_rates", "thresholds", "weight_decays", "bias_learning_rates"):
      if not getattr(self, name):
        raise ValueError(f"{name} must list at least one value.")
    if not all(lr > 0 for lr in self.bias_learning_rates):
      raise ValueError(f"bias_learning_rates must all be > 0, got {self.bias_learning_rates}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES} ('linear': the learning rate "
                       f"decays to 0 over the run's steps), got {self.schedule!r}.")

  @classmethod
  def from_params(cls, params) -> "Grid":
    """The grid of an experiment's params: every field of ``Grid`` that ``params`` has (the
    rest keep their defaults). Experiments call it in their params' check, so a bad grid is
    refused before anything runs."""
    return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(cls)
                  if hasattr(params, f.name)})

  @property
  def default_threshold(self) -> float:
    """``Config``'s default ``b = sqrt(0.4 ln m)``."""
    return math.sqrt(0.4 * math.log(self.width))


@dataclasses.dataclass(frozen=True)
class Split:
  """One regime's data: entity tables, every pair and label, and the three index sets."""
  tables: tuple[np.ndarray, ...]   # entity features, one (N_q, r_q) table per factor
  pairs: np.ndarray                # (N, p) entity indices of every pair
  labels: np.ndarray               # (N,)
  train: np.ndarray                # (n,) indices into pairs
  val: np.ndarray                  # (n_v,)
  test: np.ndarray                 # (n_t,)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One kronjax sweep: a static setting and the members it varies."""
  name: str
  centered: bool
  thresholds: tuple[float | None, ...]      # None: the default b
  weight_decays: tuple[float, ...] = (0.0,)
  output_bias: bool = False
  learning_rates: tuple[float, ...] | None = None   # None: the grid's


def _members(grid: Grid, variant: Variant, steps: int):
  """``(tx, members)``: the injected-hyperparameter optimizer and the sweep's member dicts.

  sgd on the network at the member's learning rate (``grid.schedule`` over the run's
  ``steps``); with an output bias, constant-rate sgd at the member's ``bias_learning_rate`` on
  the bias: its curvature is 1 whatever the width, the hidden layer's is ``O(1/m)``.
  """
  def rate(learning_rate):
    return (optax.linear_schedule(learning_rate, 0.0, steps) if grid.schedule == "linear"
            else learning_rate)

  thresholds = [grid.default_threshold if b is None else b for b in variant.thresholds]
  axes = {"learning_rate": list(variant.learning_rates or grid.learning_rates),
          "threshold": thresholds}
  if variant.output_bias:
    def make(learning_rate, bias_learning_rate):
      labels = lambda tree: {k: "bias" if k == "bias" else "net" for k in tree}  # pylint: disable=unnecessary-lambda-assignment
      return optax.multi_transform({"net": optax.sgd(rate(learning_rate)),
                                    "bias": optax.sgd(bias_learning_rate)}, labels)
    tx = optax.inject_hyperparams(make)(learning_rate=1.0, bias_learning_rate=1.0)
    axes["bias_learning_rate"] = list(grid.bias_learning_rates)
  elif any(variant.weight_decays):
    # Decay reads the parameters, so every step is O(m n): only when the variant asks for it.
    def make(learning_rate, weight_decay):
      return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(rate(learning_rate)))
    tx = optax.inject_hyperparams(make)(learning_rate=1.0, weight_decay=0.0)
    axes["weight_decay"] = list(variant.weight_decays)
  else:
    tx = optax.inject_hyperparams(lambda learning_rate: optax.sgd(rate(learning_rate)))(
        learning_rate=1.0)
  members = kronjax.sweep.grid(**axes)
  for member in members:
    member["seed"] = grid.seed
  return tx, members


CHOICES = ("learning_rate", "threshold", "weight_decay", "bias_learning_rate", "epoch")
"""The keys of a sweep row that say which member and epoch it is (``choices``)."""


def choices(row: Mapping) -> dict:
  """What a chosen row chose: its ``CHOICES`` entries (none for a row where every member
  diverged)."""
  return {k: row[k] for k in CHOICES if k in row}


def _scores(metrics: Mapping[str, Metric], y: np.ndarray, pred: np.ndarray, prefix: str
            ) -> dict[str, float]:
  if not np.all(np.isfinite(pred)):
    return {f"{prefix}_{name}": math.nan for name in metrics}
  return {f"{prefix}_{name}": float(fn(y, pred)) for name, fn in metrics.items()}


def scored(split: Split, metrics: Mapping[str, Metric], pred_val: np.ndarray,
           pred_test: np.ndarray) -> dict[str, float]:
  """``validation_<metric>`` and ``test_<metric>`` of predictions ``(n_v,)`` and ``(n_t,)``."""
  y = np.asarray(split.labels)
  return {**_scores(metrics, y[split.val], pred_val, "validation"),
          **_scores(metrics, y[split.test], pred_test, "test")}


def mean_baseline(split: Split, metrics: Mapping[str, Metric]) -> dict[str, float]:
  """The training mean predicted for every pair."""
  mu = float(np.mean(np.asarray(split.labels)[split.train]))
  return scored(split, metrics, np.full(len(split.val), mu), np.full(len(split.test), mu))


def kronrls_baseline(split: Split, metrics: Mapping[str, Metric], lambdas: Sequence[float]
                     ) -> dict:
  """KronRLS (Kronecker kernel ridge on the two entity Grams ``T T^T``) on the training pairs,
  labels centered on their mean, its ridge chosen by validation of the first metric
  (``kronrls.tune_lambda``: the grid extended until the optimum lies inside it).

  Returns the scores as ``scored``'s, ``chosen`` ``{"lambda"}``, ``tuning`` (a row per ridge
  tried: ``tune_lambda``'s, its ``score`` the validation first metric) and ``seconds`` (the
  tuning's fits).
  """
  Kd, Kt = (np.asarray(t, np.float64) @ np.asarray(t, np.float64).T for t in split.tables)
  y, pairs = np.asarray(split.labels), split.pairs
  mu = float(np.mean(y[split.train]))
  fn = next(iter(metrics.values()))
  models = {}
  predict = lambda lam, idx: np.asarray(kronrls.predict_kronrls(models[lam], Kd, Kt, pairs[idx])) + mu  # pylint: disable=unnecessary-lambda-assignment

  def score(lam):
    models[lam] = kronrls.fit_kronrls(Kd, Kt, pairs[split.train], y[split.train] - mu, lam)
    return fn(y[split.val], predict(lam, split.val)), {
        "iterations": int(models[lam].iterations), "converged": bool(models[lam].converged)}

  t0 = time.perf_counter()
  lam, rows = kronrls.tune_lambda(score, lambdas)
  seconds = time.perf_counter() - t0
  return {**scored(split, metrics, predict(lam, split.val), predict(lam, split.test)),
          "chosen": {"lambda": lam}, "tuning": rows, "seconds": seconds}


def sweep_run(grid: Grid, variant: Variant, split: Split, metrics: Mapping[str, Metric], *,
              progress: bool = False, plan: kronjax.Plan | None = None) -> list[dict]:
  """Trains the variant's members; one row per (member, epoch).

  A row holds the member's hyperparameters, ``epoch``, ``validation_<metric>`` and
  ``test_<metric>`` for every metric, ``active_per_step`` (mean active neurons per point of
  the epoch's last batch) and ``sweep_seconds``. Labels are centered on the training mean,
  except with an output bias (raw labels: the bias learns the mean).
  """
  # The labels in the tables' precision: float32 features train in float32, float64 in float64.
  y = np.asarray(split.labels, split.tables[0].dtype)
  shift = 0.0 if variant.output_bias else float(np.mean(y[split.train]))
  evaluated = np.concatenate([split.val, split.test])
  dataset = kronjax.Dataset(kronjax.KronData(split.tables, index=split.pairs[split.train]),
                            y[split.train] - shift,
                            eval_data=kronjax.KronData(split.tables, index=split.pairs[evaluated]),
                            eval_labels=y[evaluated] - shift)
  per_epoch = dataset.n // grid.batch_size
  tx, members = _members(grid, variant, per_epoch * grid.epochs)
  config = kronjax.Config(width=grid.width, centered=variant.centered,
                          output_bias=variant.output_bias)
  states = kronjax.sweep.init(config, dataset, members, tx=tx, plan=plan)
  n_val = len(split.val)
  y_val, y_test = y[split.val], y[split.test]
  rows = []

  def score(info):
    epoch = int(np.max(np.asarray(info.state.step))) // per_epoch
    active = np.asarray(info.metrics["active"])
    for i, member in enumerate(members):
      state = kronjax.sweep.member(info.state, i)
      pred = np.asarray(kronjax.predict(state, dataset, dataset.eval_data))[:, 0] + shift
      rows.append({"variant": variant.name, "weight_decay": 0.0, **member, "epoch": epoch,
                   **_scores(metrics, y_val, pred[:n_val], "validation"),
                   **_scores(metrics, y_test, pred[n_val:], "test"),
                   "active_per_step": float(active[i])})

  t0 = time.perf_counter()
  kronjax.sweep.fit(states, dataset, jax.random.PRNGKey(grid.seed + 1),
                    batch_size=grid.batch_size, epochs=grid.epochs, progress=progress,
                    on_nonfinite="stop", callbacks=(score,), callback_every=per_epoch)
  seconds = time.perf_counter() - t0
  for row in rows:
    row["sweep_seconds"] = seconds
  return rows


def best(rows: Sequence[dict], key: str, **match) -> dict | None:
  """The row with the lowest finite ``rows[key]`` among those matching ``match``; None if none."""
  chosen = [r for r in rows if all(r[k] == v for k, v in match.items())
            and np.isfinite(r[key])]
  return min(chosen, key=lambda r: r[key]) if chosen else None


def option_runs(grid: Grid, split: Split, metrics: Mapping[str, Metric], *,
                progress: bool = False, plan: kronjax.Plan | None = None
                ) -> tuple[list[dict], list[dict]]:
  """``(options, rows)``: one row per option (``{"method", ...}``, each the best (member,
  epoch) by validation of the first metric, None where every member diverged) and every sweep
  row."""
  key = "validation_" + next(iter(metrics))
  run = lambda variant: sweep_run(grid, variant, split, metrics, progress=progress, plan=plan)  # pylint: disable=unnecessary-lambda-assignment
  rows = run(Variant("defaults", centered=False, thresholds=(None, 0.0)))
  rows += run(Variant("centered", centered=True, thresholds=tuple(grid.thresholds)))
  curve = best(rows, key, variant="centered")
  options = [
      (f"kronjax defaults (kronecker init, b = {grid.default_threshold:.2f})",
       best(rows, key, variant="defaults", threshold=grid.default_threshold)),
      ("kronjax b = 0", best(rows, key, variant="defaults", threshold=0.0)),
      ("kronjax b = 0, centered", best(rows, key, variant="centered", threshold=0.0)),
      ("kronjax centered, best b of the curve", curve),
  ]
  decay = bias = None
  if curve is not None:
    # Decay and the bias build on the best of the curve: its threshold and learning rate.
    b, lr = (curve["threshold"],), (curve["learning_rate"],)
    rows += run(Variant("decay", centered=True, thresholds=b, learning_rates=lr,
                        weight_decays=tuple(grid.weight_decays)))
    decay = best(rows, key, variant="decay")
    rows += run(Variant("bias", centered=True, thresholds=b, learning_rates=lr,
                        output_bias=True))
    bias = best(rows, key, variant="bias")
  options += [("kronjax centered, best b, + weight decay", decay),
              ("kronjax centered, best b, + output bias (raw labels)", bias)]
  return [{"method": name, **(row or {})} for name, row in options], rows


def threshold_curve(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
  """Per threshold of the centered sweep: its best validation row (the first metric's), with
  the validation and test scores of every metric and the active neurons per point."""
  key = "validation_" + metrics[0]
  out = []
  for b in sorted({r["threshold"] for r in rows if r["variant"] == "centered"}):
    row = best(rows, key, variant="centered", threshold=b)
    if row is None:
      continue
    out.append({"threshold": b, "learning_rate": row["learning_rate"], "epoch": row["epoch"],
                **{f"{part}_{name}": row[f"{part}_{name}"]
                   for name in metrics for part in ("validation", "test")},
                "active_per_step": row["active_per_step"]})
  return out


def plot_threshold_curves(curves: Mapping[str, Sequence[dict]], metric: str, out_dir,
                          name: str, *, references: Mapping[str, float] | None = None) -> str:
  """Held-out ``metric`` and active neurons per point against ``b``, one colour per regime
  (``{regime: threshold_curve(...)}``), with horizontal ``references`` (``{label: value}``,
  coloured as the regime their label starts with); writes ``out_dir/name``, returns ``name``."""
  plt = experiment.pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.4))
  colour = {regime: f"C{k}" for k, regime in enumerate(curves)}
  for regime, curve in curves.items():
    b = [c["threshold"] for c in curve]
    ax.plot(b, [c[f"test_{metric}"] for c in curve], "o-", color=colour[regime],
            label=f"{regime}: test")
    ax.plot(b, [c[f"validation_{metric}"] for c in curve], "o--", color=colour[regime],
            alpha=0.5, label=f"{regime}: validation")
    ax2.plot(b, [c["active_per_step"] for c in curve], "o-", color=colour[regime], label=regime)
  for label, value in (references or {}).items():
    regime = next((r for r in curves if label.startswith(r)), None)
    ax.axhline(value, color=colour.get(regime, "k"), lw=0.8, ls=":", label=label)
  ax.set(xlabel="threshold b", ylabel=metric.upper(), title="held-out error (mirrored start)")
  ax2.set(xlabel="threshold b", ylabel="active neurons per point", title="sparsity")
  for a in (ax, ax2):
    a.grid(True, alpha=0.3)
    a.legend(fontsize=6)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, name, dpi=80)
