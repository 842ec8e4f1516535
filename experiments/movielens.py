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
* kronjax (``kronjax.experiments.ablation.option_runs``, as in the KIBA ablation: labels
  centered on the training mean, a vmapped ``kronjax.sweep`` per static setting, validation
  and test RMSE every epoch): the defaults (kronecker init, ``b = sqrt(0.4 ln m)``);
  ``b = 0``; ``b = 0`` with the mirrored start (``centered``); the threshold curve ``b`` in
  ``thresholds`` with the mirrored start; then, at the best ``b`` and learning rate of the
  curve, weight decay, and an output bias on the raw labels with its own learning rates (a
  member each); last, the best of these rows on validation. sgd with batches of
  ``batch_size``, its learning rate decaying linearly to 0 over the ``epochs`` (``schedule =
  "linear"``; ``"constant"`` keeps it), the epoch chosen on validation.

    kronjax run configs/movielens.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import resource
import time

import numpy as np

import kronjax
from kronjax.experiments import ablation
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
  bias_learning_rates: tuple[float, ...] = (0.02,)   # the output bias's own, a sweep axis
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
    ablation.Grid.from_params(self)   # the search grids and the schedule
    if self.source not in ("recbole", "grouplens"):
      raise ValueError(f"params.source must be 'recbole' or 'grouplens', got {self.source!r}.")
    for name in ("ridge_lambdas", "bias_lambdas", "gbt_learning_rates", "gbt_max_leaf_nodes"):
      if not getattr(self, name):
        raise ValueError(f"params.{name} must list at least one value.")


def _rmse(y: np.ndarray, pred: np.ndarray) -> float:
  return float(np.sqrt(np.mean((np.asarray(y, np.float64) - np.asarray(pred, np.float64)) ** 2)))


METRICS = {"rmse": _rmse}


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


def _method(row: dict) -> dict:
  """A scored row as the table's method entry: RMSEs and the choices (NaN where every member
  diverged)."""
  return {"val_rmse": row.get("validation_rmse", math.nan),
          "test_rmse": row.get("test_rmse", math.nan),
          "chosen": {**({"variant": row["variant"]} if "variant" in row else {}),
                     **ablation.choices(row)}}


def kronjax_runs(p: Params, split: ablation.Split, progress: bool,
                 plan: kronjax.Plan | None) -> tuple[dict[str, dict], list[dict]]:
  """``({method: entry}, sweep rows)``: ``ablation.option_runs``' options, and last the best of
  them on validation (the setting a practitioner would keep)."""
  options, rows = ablation.option_runs(ablation.Grid.from_params(p), split, METRICS,
                                       progress=progress, plan=plan)
  methods = {o["method"]: _method(o) for o in options}
  scored = [o for o in options if np.isfinite(o.get("validation_rmse", math.nan))]
  methods["kronjax, the best of the above on validation"] = _method(
      min(scored, key=lambda o: o["validation_rmse"]) if scored else {})
  return methods, rows


# --------------------------------------------------------------------------- the run


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  p = params
  out_dir = pathlib.Path(out_dir)
  checksums = experiment.read_checksums(p.checksums_file)
  data = kronjax.data.fetch_movielens(p.data_home or None, source=p.source, checksums=checksums,
                                      identity_weight=p.identity_weight,
                                      kg_min_count=p.kg_min_count)
  tables = (data.user_features.astype(np.float32), data.movie_features.astype(np.float32))
  table, metrics, curves = [], {"regimes": {}}, {}
  for regime, s in splits(p, data).items():
    split = ablation.Split(tables=tables, pairs=data.pairs, labels=data.ratings,
                           train=s["train"], val=s["val"], test=s["test"])
    ridge = ablation.kronrls_baseline(split, METRICS, p.ridge_lambdas)
    methods = {"global mean": _method(ablation.mean_baseline(split, METRICS)),
               "user + item biases": biases_run(p, data, s),
               "KronRLS (same entity kernels)": {
                   **_method(ridge), **{k: ridge[k] for k in ("chosen", "tuning", "seconds")}},
               "gradient-boosted trees (side features)": gbt_run(p, data, s)}
    options, sweep_rows = kronjax_runs(p, split, progress, plan)
    methods.update(options)
    curves[regime] = ablation.threshold_curve(sweep_rows, list(METRICS))
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
  ridge = {r: metrics["regimes"][r]["methods"]["KronRLS (same entity kernels)"]["test_rmse"]
           for r in REGIMES}
  figure = ablation.plot_threshold_curves(curves, "rmse", out_dir, "movielens.png",
                                          references={f"{r}: KronRLS test": ridge[r]
                                                      for r in REGIMES})
  return {"metrics": metrics, "table": table, "plots": [figure]}
