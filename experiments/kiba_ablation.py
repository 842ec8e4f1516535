"""KIBA drug-target affinity: kronjax option by option against KronRLS on the same features, on
warm pairs and on drugs never seen in training.

Shapes: N_d drugs, N_t targets, N measured pairs, m neurons.

Data and features as ``kiba.py`` (its ``entity_features``, imported): every measured pair is
``x = f_drug ⊗ f_target`` with drug features from the Tanimoto similarity of Morgan
fingerprints and target features from the shipped Smith-Waterman similarity (or the
fingerprint bits / 3-mer composition), the same tables for kronjax and KronRLS's kernels. The
feature maps are computed from all ``N_d`` drugs' fingerprints (no labels are involved), so an
unseen drug has features as any other.

Regimes (``splits``), each subsampled to at most ``n_train`` training and ``n_eval``
validation and test pairs:

* ``"warm"``: DeepDTA setting 1: train on the training folds but ``validation_fold``, validate
  on that fold, test on the test fold (random pairs: the same drugs and targets on both sides);
* ``"cold"``: the drugs split at random (80/10/10, ``split_seed``) and every pair goes with its
  drug, so no validation or test drug has a pair in training (unseen drugs).

Every method fits on the training pairs only, chooses its hyperparameters (kronjax also its
epoch) by validation MSE, and reports test MSE and the concordance index (CI) of that choice:
the training mean; KronRLS (Kronecker kernel ridge on the drug and target Grams, its ridge
tuned by ``kronrls.tune_lambda``); and kronjax option by option
(``kronjax.experiments.ablation.option_runs``): the defaults (kronecker init,
``b = sqrt(0.4 ln m)``), ``b = 0``, the mirrored start (``centered``), the threshold curve
(held-out error and active neurons per point against ``b``), then at the best ``b`` of the
curve weight decay and an output bias. Last, both learners on the same tables through
``kronjax.data.main_effect_features`` (``main_effect_weight``): the product kernel of pairs then
also holds each drug's and each target's effect alone (``main_effect_runs``).

    kronjax run configs/kiba_ablation.toml [--smoke]
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
METRICS = {"mse": kronrls.mse, "ci": kronrls.concordance_index}
"""Scored on validation and test after every epoch; the first (MSE) chooses."""

# kiba.py's feature code, by import: experiments are scripts, loaded from their files.
kiba_experiment = experiment.load_module(pathlib.Path(__file__).with_name("kiba.py"))


@dataclasses.dataclass(frozen=True)
class Params:
  """The data, the splits and both learners' search grids."""
  data_home: str = ""              # "" : $KRONJAX_DATA or ~/.cache/kronjax/datasets
  checksums_file: str = ""         # "" : the published files' checksums; else a JSON {file: "sha256:..."}
  drug_features: str = "tanimoto"   # "tanimoto" | "morgan"
  target_features: str = "sw"       # "sw" | "kmer"
  morgan_bits: int = 1024
  validation_fold: int = 4
  split_seed: int = 0
  n_train: int = 20000
  n_eval: int = 5000               # validation and test pairs drawn, each
  width: int = 512
  learning_rates: tuple[float, ...] = (160.0, 400.0)
  thresholds: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
  weight_decays: tuple[float, ...] = (1e-6, 1e-5)
  bias_learning_rates: tuple[float, ...] = (0.05, 0.5)
  batch_size: int = 64
  epochs: int = 6
  ridge_lambdas: tuple[float, ...] = (0.01, 0.1, 1.0)
  # The constant's weight in main_effect_features. 0 leaves out the main-effect rows (where
  # the library's weight 0 would center the features without a constant).
  main_effect_weight: float = 0.3
  seed: int = 0

  def __post_init__(self):
    experiment.require_positive(self, "width", "batch_size", "epochs", "n_train", "n_eval",
                                "morgan_bits")
    # The feature choices and the fold are checked where kiba.py checks them.
    kiba_experiment.Params(drug_features=self.drug_features,
                           target_features=self.target_features,
                           validation_fold=self.validation_fold)
    ablation.Grid.from_params(self)   # the search grids
    if not self.ridge_lambdas:
      raise ValueError("params.ridge_lambdas must list at least one value.")
    if not (math.isfinite(self.main_effect_weight) and self.main_effect_weight >= 0):
      raise ValueError(f"params.main_effect_weight must be a finite number >= 0 (0 leaves out "
                       f"the main-effect rows), got {self.main_effect_weight!r}.")


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cold_drug_split(pairs: np.ndarray, n_drugs: int, seed: int,
                    fractions=(0.8, 0.1, 0.1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(train, validation, test)`` indices into ``pairs (N, 2)``: the drugs permuted at random and
  cut by ``fractions`` (at least one drug in each part), every pair going with its drug
  (``pairs[:, 0]``)."""
  if n_drugs < 3:
    raise ValueError(f"n_drugs must be at least 3 to hold out validation and test drugs, got "
                     f"{n_drugs}.")
  order = np.random.default_rng(seed).permutation(n_drugs)
  first, second = np.round(np.cumsum(fractions)[:2] * n_drugs).astype(int)
  first = min(max(first, 1), n_drugs - 2)
  cut = (first, min(max(second, first + 1), n_drugs - 1))
  part = np.empty(n_drugs, np.int64)
  part[order[:cut[0]]], part[order[cut[0]:cut[1]]], part[order[cut[1]:]] = 0, 1, 2
  of_pair = part[pairs[:, 0]]
  return tuple(np.flatnonzero(of_pair == k) for k in range(3))


def splits(p: Params, data) -> dict[str, dict[str, np.ndarray]]:
  """``{regime: {"train", "val", "test"}}`` pair indices, subsampled to the params' sizes."""
  folds = [np.asarray(f, np.int64) for f in data.train_folds]
  warm = (np.concatenate([f for i, f in enumerate(folds) if i != p.validation_fold]),
          folds[p.validation_fold], np.asarray(data.test_fold, np.int64))
  cold = cold_drug_split(data.pairs, len(data.smiles), p.split_seed)
  rng = np.random.default_rng(p.split_seed + 1)
  caps = (p.n_train, p.n_eval, p.n_eval)
  return {regime: {name: np.sort(rng.choice(idx, min(cap, len(idx)), replace=False))
                   for name, idx, cap in zip(("train", "val", "test"), parts, caps)}
          for regime, parts in zip(REGIMES, (warm, cold))}


def main_effect_runs(p: Params, split: ablation.Split, curve: dict, progress: bool,
                     plan: kronjax.Plan | None) -> tuple[dict, dict, list[dict]]:
  """KronRLS and kronjax on both tables through ``kronjax.data.main_effect_features``:
  ``(KronRLS's scores, kronjax's option row, its sweep rows)``.

  kronjax runs the mirrored start at the best ``b`` of the curve, at a half and a quarter of
  its learning rate: the constant adds an eigenvalue of ``n w^2 / (1 + w)^2`` over ``n``
  pairs to the pair kernel, where the curve's rate may be unstable.
  """
  tables = tuple(kronjax.data.main_effect_features(t, p.main_effect_weight, name=kind)
                 for t, kind in zip(split.tables, ("drug features", "target features")))
  main = dataclasses.replace(split, tables=tables)
  baseline = ablation.kronrls_baseline(main, METRICS, p.ridge_lambdas)
  name = "kronjax centered, best b, main-effect features"
  if not curve.get("learning_rate"):   # every member of the curve diverged
    return baseline, {"method": name}, []
  lr = curve["learning_rate"]
  variant = ablation.Variant("main effects", centered=True, thresholds=(curve["threshold"],),
                             learning_rates=(lr / 2, lr / 4))
  rows = ablation.sweep_run(ablation.Grid.from_params(p), variant, main, METRICS,
                            progress=progress, plan=plan)
  row = ablation.best(rows, "validation_" + next(iter(METRICS)), variant=variant.name)
  return baseline, {"method": name, **(row or {})}, rows


def regime_run(p: Params, data, s: dict, tables, progress: bool,
               plan: kronjax.Plan | None) -> dict:
  """Every method on one regime: ``{"methods", "sweep", "threshold_curve", sizes}``."""
  split = ablation.Split(tables=tables, pairs=data.pairs, labels=data.labels, train=s["train"],
                         val=s["val"], test=s["test"])
  methods = {"training mean": ablation.mean_baseline(split, METRICS),
             "KronRLS (same features)": ablation.kronrls_baseline(split, METRICS,
                                                                  p.ridge_lambdas)}
  options, rows = ablation.option_runs(ablation.Grid.from_params(p), split, METRICS,
                                       progress=progress, plan=plan)
  if p.main_effect_weight > 0:
    curve = {o["method"]: o for o in options}["kronjax centered, best b of the curve"]
    baseline, option, main_rows = main_effect_runs(p, split, curve, progress, plan)
    methods["KronRLS, main-effect features"] = baseline
    options.append(option)
    rows += main_rows
  for option in options:
    scores = {k: option.get(k, float("nan")) for k in ("validation_mse", "validation_ci",
                                                       "test_mse", "test_ci")}
    methods[option["method"]] = {**scores, "chosen": ablation.choices(option)}
  return {"n_train": len(s["train"]), "n_val": len(s["val"]), "n_test": len(s["test"]),
          "drugs_in_train": int(len(np.unique(data.pairs[s["train"], 0]))),
          "methods": methods, "sweep": rows,
          "threshold_curve": ablation.threshold_curve(rows, list(METRICS))}


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  p = params
  out_dir = pathlib.Path(out_dir)
  checksums = experiment.read_checksums(p.checksums_file)
  data = kronjax.data.fetch_kiba(p.data_home or None, similarities=("target",),
                                 checksums=checksums)
  t0 = time.perf_counter()
  tables = kiba_experiment.entity_features(
      kiba_experiment.Params(drug_features=p.drug_features, target_features=p.target_features,
                             morgan_bits=p.morgan_bits), data)
  feature_seconds = time.perf_counter() - t0
  regimes = {regime: regime_run(p, data, s, tables, progress, plan)
             for regime, s in splits(p, data).items()}
  table = []
  for name in regimes["warm"]["methods"]:
    row = {"method": name}
    for regime in REGIMES:
      m = regimes[regime]["methods"][name]
      row[f"{regime} test MSE"], row[f"{regime} test CI"] = m["test_mse"], m["test_ci"]
    for regime in REGIMES:
      row[f"{regime} validation MSE"] = regimes[regime]["methods"][name]["validation_mse"]
    table.append(row)
  ridge = {r: regimes[r]["methods"]["KronRLS (same features)"]["test_mse"] for r in REGIMES}
  metrics = {"regimes": regimes, "pairs": int(len(data.pairs)), "drugs": len(data.smiles),
             "targets": len(data.sequences), "feature_dims": [int(t.shape[1]) for t in tables],
             "feature_seconds": feature_seconds, "peak_rss_mib": _peak_mib()}
  curves = {r: regimes[r]["threshold_curve"] for r in REGIMES}
  figure = ablation.plot_threshold_curves(curves, "mse", out_dir, "kiba_ablation.png",
                                          references={f"{r}: KronRLS test": ridge[r]
                                                      for r in REGIMES})
  return {"metrics": metrics, "table": table, "plots": [figure]}
