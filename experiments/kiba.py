"""Drug-target affinity on KIBA (DeepDTA setting 1): kronjax against Kronecker ridge and the
published table.

Shapes: N_d drugs, N_t targets, n measured pairs, m neurons.

Data (``kronjax.data.fetch_kiba``): 2,111 drugs x 229 targets, 118,254 measured pairs, five
training folds and one test fold. Every pair is ``x = f_drug ⊗ f_target``: entity-indexed
data, so the Gram comes from the two entity Grams and no ``n x n`` matrix exists.

Features, the same for both learners:

* drugs: ``"tanimoto"``, the Tanimoto similarity of RDKit Morgan fingerprints
  (``morgan_fingerprints``) turned into features by ``kernel_features`` (the nearest PSD
  matrix with unit diagonal), or ``"morgan"``, the fingerprint bits (rows normalized);
* targets: ``"sw"``, the Smith-Waterman similarity shipped with the data set through
  ``kernel_features``, or ``"kmer"``, amino-acid 3-mer composition (rows normalized).

Protocol. Hyperparameters are tuned on the training folds only: train on all training folds
but ``validation_fold``, score on that fold. kronjax: a vmapped sweep over learning rate,
threshold and weight decay (``kronjax.sweep``), evaluated every epoch; the best (member,
epoch) by validation MSE is retrained on all five training folds for that many epochs.
KronRLS (Kronecker kernel ridge by conjugate gradients with the vec trick,
``kronjax.experiments.kronrls``) on the same features' kernels: ridge ``lambda`` tuned the
same way (the grid extended past its edges until the optimum lies inside it), refit on all
training folds. Both are scored on the test fold: MSE and the
concordance index (CI), with training time and the process's peak memory.

    kronjax run configs/kiba.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import pathlib
import resource
import time

import jax
import numpy as np
import optax

import kronjax
from kronjax.experiments import kronrls
from kronjax.experiments import runner as experiment

# DeepDTA (Öztürk et al. 2018), KIBA, setting 1, test fold: as published.
PUBLISHED = (
    {"method": "KronRLS (published: SW + PubChem similarity)", "mse": 0.411, "ci": 0.782},
    {"method": "SimBoost (published)", "mse": 0.222, "ci": 0.836},
    {"method": "DeepDTA (published)", "mse": 0.194, "ci": 0.863},
)


@dataclasses.dataclass(frozen=True)
class Params:
  """The data, the features and the two learners' search grids."""
  data_home: str = ""              # "" : $KRONJAX_DATA or ~/.cache/kronjax/datasets
  checksums_file: str = ""         # "" : the published files' checksums; else a JSON {file: "sha256:..."}
  drug_features: str = "tanimoto"   # "tanimoto" | "morgan"
  target_features: str = "sw"       # "sw" | "kmer"
  morgan_bits: int = 1024
  validation_fold: int = 4
  width: int = 1024
  learning_rates: tuple[float, ...] = (4.0, 16.0)
  thresholds: tuple[float, ...] = (0.0,)
  weight_decays: tuple[float, ...] = (0.0,)
  centered: bool = True
  batch_size: int = 64
  tune_epochs: int = 2
  ridge_lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
  seed: int = 0

  def __post_init__(self):
    experiment.require_positive(self, "width", "batch_size", "tune_epochs", "morgan_bits")
    if self.drug_features not in ("tanimoto", "morgan"):
      raise ValueError(f"params.drug_features must be 'tanimoto' or 'morgan', got "
                       f"{self.drug_features!r}.")
    if self.target_features not in ("sw", "kmer"):
      raise ValueError(f"params.target_features must be 'sw' or 'kmer', got "
                       f"{self.target_features!r}.")
    if not 0 <= self.validation_fold < 5:
      raise ValueError(f"params.validation_fold must be in [0, 5), got {self.validation_fold}.")


def _unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def entity_features(p: Params, kiba) -> tuple[np.ndarray, np.ndarray]:
  """``(F_d (N_d, r_d), F_t (N_t, r_t))`` float32 unit rows, from the params' choices."""
  if p.drug_features == "tanimoto":
    bits = kronjax.data.morgan_fingerprints(kiba.smiles, n_bits=p.morgan_bits).astype(np.float64)
    inter = bits @ bits.T
    count = bits.sum(axis=1)
    union = count[:, None] + count[None, :] - inter
    tanimoto = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    drugs = kronjax.data.kernel_features(tanimoto, name="drug Tanimoto").features
  else:
    drugs = _unit_rows(kronjax.data.morgan_fingerprints(kiba.smiles, n_bits=p.morgan_bits)
                       .astype(np.float64) + 1e-12)
  if p.target_features == "sw":
    targets = kronjax.data.kernel_features(kiba.target_similarity, name="target SW").features
  else:
    targets = _unit_rows(kronjax.data.kmer_composition(kiba.sequences, k=3).astype(np.float64))
  return drugs.astype(np.float32), targets.astype(np.float32)


def _dataset(tables, pairs, y, eval_pairs=None, eval_y=None) -> kronjax.Dataset:
  data = kronjax.KronData(tables, index=pairs)
  eval_data = None if eval_pairs is None else kronjax.KronData(tables, index=eval_pairs)
  return kronjax.Dataset(data, y, eval_data=eval_data, eval_labels=eval_y)


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decayed_sgd(learning_rate, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


def tune_kronjax(p: Params, tables, pairs, y, val_pairs, val_y, mean, progress: bool,
                 plan: kronjax.Plan | None):
  """The sweep on the tuning split; returns per-(member, epoch) validation MSE rows and the best."""
  dataset = _dataset(tables, pairs, y - mean, val_pairs, val_y - mean)

  axes = {"learning_rate": list(p.learning_rates), "threshold": list(p.thresholds)}
  if any(p.weight_decays):
    # Decay makes every step O(m n) (the optimizer reads the parameters): only when asked for.
    tx = optax.inject_hyperparams(_decayed_sgd)(learning_rate=1.0, weight_decay=0.0)
    axes["weight_decay"] = list(p.weight_decays)
  else:
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  members = kronjax.sweep.grid(**axes)
  for member in members:
    member["seed"] = p.seed
  config = kronjax.Config(width=p.width, centered=p.centered)
  states = kronjax.sweep.init(config, dataset, members, tx=tx, plan=plan)
  per_epoch = dataset.n // p.batch_size
  states, history = kronjax.sweep.fit(
      states, dataset, jax.random.PRNGKey(p.seed + 1), batch_size=p.batch_size,
      epochs=p.tune_epochs, eval_every=per_epoch, progress=progress, on_nonfinite="stop")
  rows = []
  steps, active = np.asarray(history["step"]), np.asarray(history["active"])
  for i, member in enumerate(members):
    for e, mse in enumerate(np.asarray(history["eval_mse"])[i], start=1):
      at = np.flatnonzero(steps == e * per_epoch)
      rows.append({"weight_decay": 0.0, **member, "epoch": e, "validation_mse": float(mse),
                   "active_per_step": float(active[i][at[0]]) if at.size else None})
  finite = [r for r in rows if np.isfinite(r["validation_mse"])]
  best = min(finite, key=lambda r: r["validation_mse"])
  return rows, best


def train_kronjax(p: Params, best: dict, tables, pairs, y, test_pairs, test_y, mean,
                  plan: kronjax.Plan | None):
  """The chosen setting on all training folds; test MSE, CI, seconds."""
  dataset = _dataset(tables, pairs, y - mean, test_pairs, test_y - mean)
  config = kronjax.Config(width=p.width, centered=p.centered)
  tx = (_decayed_sgd(best["learning_rate"], best["weight_decay"]) if best["weight_decay"]
        else optax.sgd(best["learning_rate"]))
  t0 = time.perf_counter()
  state = kronjax.init(jax.random.PRNGKey(p.seed), config, dataset, tx,
                       threshold=best["threshold"], plan=plan)
  state, _ = kronjax.fit(state, dataset, jax.random.PRNGKey(p.seed + 1),
                         batch_size=p.batch_size, epochs=best["epoch"], progress=False)
  pred = np.asarray(kronjax.predict(state, dataset, dataset.eval_data))[:, 0] + mean
  seconds = time.perf_counter() - t0
  return {"mse": kronrls.mse(test_y, pred), "ci": kronrls.concordance_index(test_y, pred),
          "seconds": seconds}


def kronrls_runs(p: Params, tables, pairs, y, val_pairs, val_y, test_pairs, test_y, mean):
  """Ridge lambda tuned on the validation fold (the grid extended until the optimum lies inside
  it, ``kronrls.tune_lambda``), then refit on all training folds."""
  Kd = tables[0].astype(np.float64) @ tables[0].T.astype(np.float64)
  Kt = tables[1].astype(np.float64) @ tables[1].T.astype(np.float64)

  def score(lam):
    model = kronrls.fit_kronrls(Kd, Kt, pairs, y - mean, lam)
    pred = np.asarray(kronrls.predict_kronrls(model, Kd, Kt, val_pairs)) + mean
    return kronrls.mse(val_y, pred), {"iterations": int(model.iterations),
                                      "converged": bool(model.converged)}

  lam, tune_rows = kronrls.tune_lambda(score, p.ridge_lambdas)
  for row in tune_rows:
    row["validation_mse"] = row.pop("score")
  all_pairs = np.concatenate([pairs, val_pairs])
  all_y = np.concatenate([y, val_y])
  t0 = time.perf_counter()
  model = kronrls.fit_kronrls(Kd, Kt, all_pairs, all_y - mean, lam)
  pred = np.asarray(kronrls.predict_kronrls(model, Kd, Kt, test_pairs)) + mean
  seconds = time.perf_counter() - t0
  return tune_rows, {"lambda": lam, "mse": kronrls.mse(test_y, pred),
                     "ci": kronrls.concordance_index(test_y, pred), "seconds": seconds}


def plot(table: list[dict], out_dir: pathlib.Path) -> str:
  plt = experiment.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, row in enumerate(table):
    ax.scatter(row["test MSE"], row["test CI"], s=40, color=f"C{i}", label=row["method"])
  ax.set(xlabel="test MSE (lower is better)", ylabel="test CI (higher is better)",
         title="KIBA, DeepDTA setting 1: test fold")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, "kiba.png", dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  p = params
  out_dir = pathlib.Path(out_dir)
  checksums = experiment.read_checksums(p.checksums_file)
  kiba = kronjax.data.fetch_kiba(p.data_home or None, similarities=("target",),
                                 checksums=checksums)
  t0 = time.perf_counter()
  tables = entity_features(p, kiba)
  feature_seconds = time.perf_counter() - t0
  y = kiba.labels.astype(np.float32)
  folds = [np.asarray(f) for f in kiba.train_folds]
  tune_idx = np.concatenate([f for i, f in enumerate(folds) if i != p.validation_fold])
  val_idx = folds[p.validation_fold]
  train_idx = np.concatenate(folds)
  test_idx = np.asarray(kiba.test_fold)
  pairs = kiba.pairs
  tune_mean = float(np.mean(y[tune_idx]))
  mean = float(np.mean(y[train_idx]))

  sweep_rows, best = tune_kronjax(p, tables, pairs[tune_idx], y[tune_idx], pairs[val_idx],
                                  y[val_idx], tune_mean, progress, plan)
  kron = train_kronjax(p, best, tables, pairs[train_idx], y[train_idx], pairs[test_idx],
                       y[test_idx], mean, plan)
  ridge_rows, ridge = kronrls_runs(p, tables, pairs[tune_idx], y[tune_idx], pairs[val_idx],
                                   y[val_idx], pairs[test_idx], y[test_idx], tune_mean)
  table = [
      {"method": f"kronjax (m = {p.width}, same features)", "test MSE": kron["mse"],
       "test CI": kron["ci"], "train seconds": kron["seconds"]},
      {"method": "KronRLS (same features)", "test MSE": ridge["mse"], "test CI": ridge["ci"],
       "train seconds": ridge["seconds"]},
  ] + [{"method": r["method"], "test MSE": r["mse"], "test CI": r["ci"], "train seconds": None}
       for r in PUBLISHED]
  metrics = {
      "n_pairs": int(len(pairs)), "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
      "drugs": int(tables[0].shape[0]), "targets": int(tables[1].shape[0]),
      "feature_dims": [int(t.shape[1]) for t in tables], "feature_seconds": feature_seconds,
      "kronjax": {**kron, "chosen": best}, "kronrls": ridge, "sweep": sweep_rows,
      "ridge_tuning": ridge_rows, "published": list(PUBLISHED), "peak_rss_mib": _peak_mib()}
  return {"metrics": metrics, "table": table, "plots": [plot(table, out_dir)]}
