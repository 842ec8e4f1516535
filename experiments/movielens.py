"""MovieLens-100k ratings: kronjax option by option against the baselines, on warm pairs and
on movies never seen in training.

Shapes: N_u users, N_m movies, n ratings, m neurons.

Data (``kronjax.data.fetch_movielens``): 943 users x 1,682 movies, 100,000 ratings. Every
rating is a pair ``x = f_user ⊗ f_movie`` (entity-indexed data): user features (a constant,
age bucket, gender, occupation, zip region, an identity block), movie features (a constant,
genres, release-year bucket, knowledge-graph facts, an identity block), each block of equal
weight but the identity's (``identity_weight``), every row unit-norm. The same tables feed
KronRLS (their Grams) and the gradient-boosted trees (the side-feature columns).

Protocol, per regime (``kronjax.data.split_ratings``): ``"warm"`` splits the ratings at random
(80/10/10), ``"cold"`` splits the movies, so validation and test movies are never rated in
training; at most ``n_train`` / ``n_eval`` ratings are drawn from each part. Every method fits
on the training ratings only, chooses its hyperparameters (and kronjax its epoch) by
validation RMSE, and reports the test RMSE of that choice.

* global mean; user and item biases (ridge-regularized, alternating least squares; an unseen
  movie's bias is 0);
* KronRLS on the entity Grams, its ridge tuned by ``kronrls.tune_lambda`` (the grid extended
  until the optimum is inside it);
* gradient-boosted trees (scikit-learn ``HistGradientBoostingRegressor``) on the concatenated
  side features, the number of trees chosen on validation;
* kronjax (labels centered on the training mean, a vmapped ``kronjax.sweep`` per static
  setting, validation and test RMSE read from the maintained eval projections every epoch):
  the defaults (kronecker init, ``b = sqrt(0.4 ln m)``); ``b = 0``; ``b = 0`` with the
  mirrored start (``centered``); the threshold curve ``b`` in ``thresholds`` with the mirrored
  start; then, at the best ``b`` and learning rate of the curve, weight decay, and an output
  bias on the raw labels with its own learning rate; last, the best of these rows on
  validation. sgd with batches of ``batch_size``, its learning rate decaying linearly to 0
  over the ``epochs`` (``schedule = "linear"``; ``"constant"`` keeps it), the epoch chosen on
  validation.

    kronjax run configs/movielens.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import resource
import time

import jax
import numpy as np
import optax

import kronjax
from kronjax.experiments import kronrls
from kronjax.experiments import runner as experiment

REGIMES = ("warm", "cold")


@dataclasses.dataclass(frozen=True)
class Params:
  """The data, the splits and every learner's search grid."""
  data_home: str = ""              # "" : $KRONJAX_DATA or ~/.cache/kronjax/datasets
  checksums_file: str = ""         # "" : the published checksums; else a JSON {file: "sha256:..."}
  source: str = "recbole"          # "recbole" (with knowledge-graph facts) | "grouplens"
  identity_weight: float = 1.0
  kg_min_count: int = 5
  n_train: int = 20000
  n_eval: int = 5000               # validation and test ratings drawn, each
  split_seed: int = 0
  width: int = 1024
  learning_rates: tuple[float, ...] = (64.0,)
  thresholds: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
  weight_decays: tuple[float, ...] = (1e-5,)
  bias_learning_rate: float = 0.02
  batch_size: int = 64
  epochs: int = 5
  schedule: str = "linear"         # "linear": the learning rate decays to 0 over the epochs
  ridge_lambdas: tuple[float, ...] = (0.3, 1.0, 3.0)
  bias_lambdas: tuple[float, ...] = (1.0, 3.0, 10.0)
  gbt_learning_rates: tuple[float, ...] = (0.1,)
  gbt_max_leaf_nodes: tuple[int, ...] = (31,)
  gbt_max_iter: int = 200
  seed: int = 0

  def __post_init__(self):
    experiment.require_positive(self, "width", "batch_size", "epochs", "n_train", "n_eval",
                                "kg_min_count", "gbt_max_iter")
    if self.schedule not in ("linear", "constant"):
      raise ValueError(f"params.schedule must be 'linear' (decay to 0 over the epochs) or "
                       f"'constant', got {self.schedule!r}.")
    if self.source not in ("recbole", "grouplens"):
      raise ValueError(f"params.source must be 'recbole' or 'grouplens', got {self.source!r}.")
    for name in ("learning_rates", "thresholds", "weight_decays", "ridge_lambdas",
                 "bias_lambdas", "gbt_learning_rates", "gbt_max_leaf_nodes"):
      if not getattr(self, name):
        raise ValueError(f"params.{name} must list at least one value.")


def _rmse(y: np.ndarray, pred: np.ndarray) -> float:
  return float(np.sqrt(np.mean((np.asarray(y, np.float64) - np.asarray(pred, np.float64)) ** 2)))


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def splits(p: Params, data) -> dict[str, dict[str, np.ndarray]]:
  """``{regime: {"train", "val", "test"}}`` rating indices, subsampled to the params' sizes."""
  out = {}
  rng = np.random.default_rng(p.split_seed + 1)
  for regime in REGIMES:
    parts = kronjax.data.split_ratings(data, regime, seed=p.split_seed)
    caps = (p.n_train, p.n_eval, p.n_eval)
    out[regime] = {name: np.sort(rng.choice(idx, min(cap, len(idx)), replace=False))
                   for name, idx, cap in zip(("train", "val", "test"), parts, caps)}
  return out


# --------------------------------------------------------------------------- baselines


def fit_biases(pairs: np.ndarray, y: np.ndarray, shape: tuple[int, int], lam: float,
               sweeps: int = 20) -> tuple[float, np.ndarray, np.ndarray]:
  """``(mu, b_u (N_u,), b_i (N_m,))`` minimizing ``sum (y - mu - b_u - b_i)^2 + lam (|b_u|^2 +
  |b_i|^2)`` by alternating exact updates."""
  mu = float(np.mean(y))
  bu, bi = np.zeros(shape[0]), np.zeros(shape[1])
  u, i = pairs[:, 0], pairs[:, 1]
  cu = np.bincount(u, minlength=shape[0])
  ci = np.bincount(i, minlength=shape[1])
  for _ in range(sweeps):
    bu = np.bincount(u, y - mu - bi[i], minlength=shape[0]) / (cu + lam)
    bi = np.bincount(i, y - mu - bu[u], minlength=shape[1]) / (ci + lam)
  return mu, bu, bi


def biases_run(p: Params, data, s) -> dict:
  y, pairs = data.ratings, data.pairs
  shape = (len(data.user_ids), len(data.movie_ids))
  predict = lambda model, idx: model[0] + model[1][pairs[idx, 0]] + model[2][pairs[idx, 1]]  # pylint: disable=unnecessary-lambda-assignment
  models = {}

  def score(lam):
    models[lam] = fit_biases(pairs[s["train"]], y[s["train"]], shape, lam)
    return _rmse(y[s["val"]], predict(models[lam], s["val"]))

  lam, rows = kronrls.tune_lambda(score, p.bias_lambdas)
  return {"val_rmse": min(r["score"] for r in rows), "test_rmse": _rmse(y[s["test"]],
          predict(models[lam], s["test"])), "chosen": {"lambda": lam}, "tuning": rows}


def kronrls_run(p: Params, data, s, grams) -> dict:
  Ku, Km = grams
  y, pairs = data.ratings, data.pairs
  mu = float(np.mean(y[s["train"]]))
  models = {}

  def score(lam):
    model = kronrls.fit_kronrls(Ku, Km, pairs[s["train"]], y[s["train"]] - mu, lam)
    models[lam] = model
    pred = np.asarray(kronrls.predict_kronrls(model, Ku, Km, pairs[s["val"]])) + mu
    return _rmse(y[s["val"]], pred), {"iterations": int(model.iterations),
                                      "converged": bool(model.converged)}

  t0 = time.perf_counter()
  lam, rows = kronrls.tune_lambda(score, p.ridge_lambdas)
  seconds = time.perf_counter() - t0
  pred = np.asarray(kronrls.predict_kronrls(models[lam], Ku, Km, pairs[s["test"]])) + mu
  return {"val_rmse": min(r["score"] for r in rows), "test_rmse": _rmse(y[s["test"]], pred),
          "chosen": {"lambda": lam}, "tuning": rows, "seconds": seconds}


def side_columns(names: list[str]) -> np.ndarray:
  """The columns of a table that are side features (not the constant or the identity)."""
  return np.array([k for k, n in enumerate(names) if n != "const" and not n.startswith("id:")])


def gbt_run(p: Params, data, s) -> dict:
  from sklearn.ensemble import HistGradientBoostingRegressor  # pylint: disable=import-outside-toplevel
  U = data.user_features[:, side_columns(data.user_feature_names)].astype(np.float32)
  M = data.movie_features[:, side_columns(data.movie_feature_names)].astype(np.float32)
  feats = lambda idx: np.concatenate([U[data.pairs[idx, 0]], M[data.pairs[idx, 1]]], axis=1)  # pylint: disable=unnecessary-lambda-assignment
  X = {k: feats(v) for k, v in s.items()}
  y = data.ratings
  rows, best = [], None
  t0 = time.perf_counter()
  for lr in p.gbt_learning_rates:
    for leaves in p.gbt_max_leaf_nodes:
      model = HistGradientBoostingRegressor(
          learning_rate=lr, max_leaf_nodes=leaves, max_iter=p.gbt_max_iter, early_stopping=False,
          random_state=p.seed).fit(X["train"], y[s["train"]])
      val = [_rmse(y[s["val"]], pr) for pr in model.staged_predict(X["val"])]
      trees = int(np.argmin(val)) + 1
      row = {"learning_rate": lr, "max_leaf_nodes": leaves, "trees": trees,
             "validation_rmse": val[trees - 1]}
      rows.append(row)
      if best is None or row["validation_rmse"] < best[0]["validation_rmse"]:
        test = [_rmse(y[s["test"]], pr) for pr in model.staged_predict(X["test"])]
        best = (row, test[trees - 1])
  return {"val_rmse": best[0]["validation_rmse"], "test_rmse": best[1], "chosen": best[0],
          "tuning": rows, "seconds": time.perf_counter() - t0, "features": int(X["train"].shape[1])}


# --------------------------------------------------------------------------- kronjax


def _optimizer(schedule: str, steps: int, output_bias: bool):
  """The optimizer factory a sweep injects its hyperparameters into: sgd on the network, its
  learning rate constant or decaying linearly to 0 over ``steps`` (the noise of small batches
  settles at the end instead of holding the error at its floor), after weight decay; with an
  output bias, constant-rate sgd at ``bias_learning_rate`` on the bias (its curvature is 1
  whatever the width, the hidden layer's is ``O(1/m)``)."""

  def make(learning_rate, weight_decay=0.0, bias_learning_rate=0.0):
    rate = (optax.linear_schedule(learning_rate, 0.0, steps) if schedule == "linear"
            else learning_rate)
    net = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(rate))
    if not output_bias:
      return net
    labels = lambda tree: {k: "bias" if k == "bias" else "net" for k in tree}  # pylint: disable=unnecessary-lambda-assignment
    return optax.multi_transform({"net": net, "bias": optax.sgd(bias_learning_rate)}, labels)

  return make


@dataclasses.dataclass(frozen=True)
class Variant:
  """One kronjax sweep: a static setting and the members it varies."""
  name: str
  centered: bool
  thresholds: tuple[float | None, ...]
  weight_decays: tuple[float, ...] = (0.0,)
  output_bias: bool = False
  learning_rates: tuple[float, ...] | None = None   # None: the params' grid


def sweep_run(p: Params, variant: Variant, data, s, tables, progress: bool,
              plan: kronjax.Plan | None) -> list[dict]:
  """Trains the variant's members; one row per (member, epoch) with validation and test RMSE."""
  y = data.ratings.astype(np.float32)
  shift = 0.0 if variant.output_bias else float(np.mean(y[s["train"]]))
  index = data.pairs
  evaluated = np.concatenate([s["val"], s["test"]])
  dataset = kronjax.Dataset(kronjax.KronData(tables, index=index[s["train"]]),
                            y[s["train"]] - shift,
                            eval_data=kronjax.KronData(tables, index=index[evaluated]),
                            eval_labels=y[evaluated] - shift)
  default_b = math.sqrt(0.4 * math.log(p.width))
  thresholds = [default_b if b is None else b for b in variant.thresholds]
  axes = {"learning_rate": list(variant.learning_rates or p.learning_rates),
          "threshold": thresholds}
  per_epoch = dataset.n // p.batch_size
  make = _optimizer(p.schedule, per_epoch * p.epochs, variant.output_bias)
  tx = optax.inject_hyperparams(make)(learning_rate=1.0, weight_decay=0.0,
                                      bias_learning_rate=p.bias_learning_rate)
  if any(variant.weight_decays):
    axes["weight_decay"] = list(variant.weight_decays)
  members = kronjax.sweep.grid(**axes)
  for member in members:
    member["seed"] = p.seed
  config = kronjax.Config(width=p.width, centered=variant.centered,
                          output_bias=variant.output_bias)
  states = kronjax.sweep.init(config, dataset, members, tx=tx, plan=plan)
  n_val = len(s["val"])
  rows = []

  def score(info):
    epoch = int(np.max(np.asarray(info.state.step))) // per_epoch
    for i, member in enumerate(members):
      state = kronjax.sweep.member(info.state, i)
      pred = np.asarray(kronjax.predict(state, dataset, dataset.eval_data))[:, 0] + shift
      rows.append({"variant": variant.name, "weight_decay": 0.0, **member, "epoch": epoch,
                   "validation_rmse": _rmse(y[s["val"]], pred[:n_val]),
                   "test_rmse": _rmse(y[s["test"]], pred[n_val:]),
                   "active_per_step": float(np.asarray(info.metrics["active"])[i])})

  t0 = time.perf_counter()
  kronjax.sweep.fit(states, dataset, jax.random.PRNGKey(p.seed + 1), batch_size=p.batch_size,
                    epochs=p.epochs, progress=progress, on_nonfinite="stop",
                    callbacks=(score,), callback_every=per_epoch)
  seconds = time.perf_counter() - t0
  for row in rows:
    row["sweep_seconds"] = seconds
  return rows


def _best(rows: list[dict], **match) -> dict:
  chosen = [r for r in rows if all(r[k] == v for k, v in match.items())
            and np.isfinite(r["validation_rmse"])]
  return min(chosen, key=lambda r: r["validation_rmse"])


def kronjax_runs(p: Params, data, s, tables, progress, plan) -> tuple[list[dict], list[dict]]:
  """The option-by-option rows (each chosen on validation) and every sweep row."""
  default = Variant("defaults", centered=False, thresholds=(None, 0.0))
  curve = Variant("centered", centered=True, thresholds=tuple(p.thresholds))
  rows = sweep_run(p, default, data, s, tables, progress, plan)
  rows += sweep_run(p, curve, data, s, tables, progress, plan)
  default_b = math.sqrt(0.4 * math.log(p.width))
  centered_b0 = _best(rows, variant="centered", threshold=0.0)
  best_curve = _best(rows, variant="centered")
  # Decay and the bias build on the best of the curve: its threshold and learning rate.
  b, lr = best_curve["threshold"], (best_curve["learning_rate"],)
  rows += sweep_run(p, Variant("decay", centered=True, thresholds=(b,), learning_rates=lr,
                               weight_decays=tuple(p.weight_decays)),
                    data, s, tables, progress, plan)
  decay = _best(rows, variant="decay")
  rows += sweep_run(p, Variant("bias", centered=True, thresholds=(b,), learning_rates=lr,
                               output_bias=True),
                    data, s, tables, progress, plan)
  bias = _best(rows, variant="bias")
  options = [
      (f"kronjax defaults (kronecker init, b = {default_b:.2f})",
       _best(rows, variant="defaults", threshold=default_b)),
      ("kronjax b = 0", _best(rows, variant="defaults", threshold=0.0)),
      ("kronjax b = 0, centered", centered_b0),
      ("kronjax centered, best b of the curve", best_curve),
      ("kronjax centered, best b, + weight decay", decay),
      ("kronjax centered, best b, + output bias (raw labels)", bias),
  ]
  # The setting a practitioner would keep: every kronjax row above, chosen on validation only.
  options.append(("kronjax, the best of the above on validation",
                  min((row for _, row in options), key=lambda r: r["validation_rmse"])))
  chosen = [{"method": name, **row} for name, row in options]
  return chosen, rows


def threshold_curve(rows: list[dict]) -> list[dict]:
  """Per threshold of the centered sweep: the best validation row (its test RMSE, active)."""
  out = []
  for b in sorted({r["threshold"] for r in rows if r["variant"] == "centered"}):
    best = _best(rows, variant="centered", threshold=b)
    out.append({"threshold": b, "learning_rate": best["learning_rate"], "epoch": best["epoch"],
                "validation_rmse": best["validation_rmse"], "test_rmse": best["test_rmse"],
                "active_per_step": best["active_per_step"]})
  return out


# --------------------------------------------------------------------------- the run


def plot(curves: dict[str, list[dict]], out_dir: pathlib.Path) -> str:
  plt = experiment.pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.4))
  for k, (regime, curve) in enumerate(curves.items()):
    b = [c["threshold"] for c in curve]
    ax.plot(b, [c["test_rmse"] for c in curve], "o-", color=f"C{k}", label=f"{regime}: test")
    ax.plot(b, [c["validation_rmse"] for c in curve], "o--", color=f"C{k}", alpha=0.5,
            label=f"{regime}: validation")
    ax2.plot(b, [c["active_per_step"] for c in curve], "o-", color=f"C{k}", label=regime)
  ax.set(xlabel="threshold b", ylabel="RMSE", title="held-out error")
  ax2.set(xlabel="threshold b", ylabel="active neurons per point", title="sparsity")
  for a in (ax, ax2):
    a.grid(True, alpha=0.3)
    a.legend(fontsize=7)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, "movielens.png", dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  p = params
  out_dir = pathlib.Path(out_dir)
  checksums = experiment.read_checksums(p.checksums_file)
  data = kronjax.data.fetch_movielens(p.data_home or None, source=p.source, checksums=checksums,
                                      identity_weight=p.identity_weight,
                                      kg_min_count=p.kg_min_count)
  tables = (data.user_features.astype(np.float32), data.movie_features.astype(np.float32))
  grams = (data.user_features @ data.user_features.T, data.movie_features @ data.movie_features.T)
  table, metrics, curves = [], {"regimes": {}}, {}
  for regime, s in splits(p, data).items():
    y = data.ratings
    mean = float(np.mean(y[s["train"]]))
    methods = {"global mean": {"val_rmse": _rmse(y[s["val"]], np.full(len(s["val"]), mean)),
                               "test_rmse": _rmse(y[s["test"]], np.full(len(s["test"]), mean))},
               "user + item biases": biases_run(p, data, s),
               "KronRLS (same entity kernels)": kronrls_run(p, data, s, grams),
               "gradient-boosted trees (side features)": gbt_run(p, data, s)}
    chosen, sweep_rows = kronjax_runs(p, data, s, tables, progress, plan)
    for row in chosen:
      methods[row["method"]] = {"val_rmse": row["validation_rmse"], "test_rmse": row["test_rmse"],
                                "chosen": {k: row[k] for k in ("variant", "learning_rate",
                                                               "threshold", "weight_decay",
                                                               "epoch")}}
    curves[regime] = threshold_curve(sweep_rows)
    metrics["regimes"][regime] = {
        "n_train": len(s["train"]), "n_val": len(s["val"]), "n_test": len(s["test"]),
        "methods": methods, "sweep": sweep_rows, "threshold_curve": curves[regime]}
  for name in metrics["regimes"]["warm"]["methods"]:
    row = {"method": name}
    for regime in REGIMES:
      m = metrics["regimes"][regime]["methods"][name]
      row[f"{regime} test RMSE"] = m["test_rmse"]
      row[f"{regime} validation RMSE"] = m["val_rmse"]
    table.append(row)
  metrics.update({"users": len(data.user_ids), "movies": len(data.movie_ids),
                  "ratings": len(data.pairs), "feature_dims": [int(t.shape[1]) for t in tables],
                  "source": data.source, "peak_rss_mib": _peak_mib()})
  return {"metrics": metrics, "table": table, "plots": [plot(curves, out_dir)]}
