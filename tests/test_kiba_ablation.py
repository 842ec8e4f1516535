"""The KIBA ablation and the shared option-by-option code (kronjax.experiments.ablation).

* every sweep row's validation and test scores equal, in float64, those of dense SGD from the
  same start on the same batches (each variant: the kronecker and the mirrored start, weight
  decay, the output bias on raw labels);
* the choice on validation, the threshold curve and the unseen-drug split;
* the experiment at smoke scale on the DeepDTA-format fixture, and its parameter errors.
"""

import dataclasses
import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import dense
from kronjax.experiments import ablation
from kronjax.experiments import runner as experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
  return experiment.load_module(ROOT / "experiments" / "kiba_ablation.py")


def _split(seed=0) -> ablation.Split:
  """4 drugs (dim 3) x 5 targets (dim 4), float64 unit rows, all 20 pairs; 14 train, 3 + 3
  held-out."""
  rng = np.random.default_rng(seed)
  tables = tuple(t / np.linalg.norm(t, axis=1, keepdims=True)
                 for t in (rng.normal(size=(4, 3)), rng.normal(size=(5, 4))))
  pairs = np.array([(d, t) for d in range(4) for t in range(5)], np.int32)
  # A planted linear signal in x = f_drug ⊗ f_target, and noise: the ridge's optimum is inside.
  X = np.stack([np.kron(tables[0][d], tables[1][t]) for d, t in pairs])
  labels = 3.0 + 2.0 * X @ rng.normal(size=12) + 0.3 * rng.normal(size=len(pairs))
  order = rng.permutation(len(pairs))
  return ablation.Split(tables, pairs, labels, np.sort(order[:14]), order[14:17], order[17:])


GRID = ablation.Grid(width=8, learning_rates=(0.5, 2.0), thresholds=(0.0, 0.4),
                     weight_decays=(1e-3,), bias_learning_rates=(0.1, 0.5), batch_size=4, epochs=2)
METRICS = {"mse": lambda y, p: float(np.mean((y - p) ** 2)),
           "mae": lambda y, p: float(np.mean(np.abs(y - p)))}


def _dense_tx(grid, variant, row, steps):
  """The member's optimizer, written out: sgd (its rate linear to 0 over ``steps`` under the
  linear schedule), after weight decay; with an output bias, constant-rate sgd on the bias."""
  rate = (optax.linear_schedule(row["learning_rate"], 0.0, steps) if grid.schedule == "linear"
          else row["learning_rate"])
  if variant.output_bias:
    labels = lambda tree: {k: "bias" if k == "bias" else "net" for k in tree}  # pylint: disable=unnecessary-lambda-assignment
    return optax.multi_transform({"net": optax.sgd(rate),
                                  "bias": optax.sgd(row["bias_learning_rate"])}, labels)
  if any(variant.weight_decays):
    return optax.chain(optax.add_decayed_weights(row["weight_decay"]), optax.sgd(rate))
  return optax.sgd(rate)


def _dense_scores(split, variant, row, grid=GRID):
  """``{epoch: scores}``: the row's member trained by dense SGD (``kronjax.dense``) on
  ``kronjax.fit``'s batches, scored after every epoch."""
  X = np.stack([np.kron(*(t[p] for t, p in zip(split.tables, pair))) for pair in split.pairs])
  shift = 0.0 if variant.output_bias else float(np.mean(split.labels[split.train]))
  y = jnp.asarray(split.labels - shift)[:, None]
  config = kronjax.Config(width=grid.width, centered=variant.centered,
                          output_bias=variant.output_bias)
  n = len(split.train)
  per_epoch = n // grid.batch_size
  tx = _dense_tx(grid, variant, row, grid.epochs * per_epoch)
  state = dense.init(jax.random.PRNGKey(row["seed"]), config, (3, 4), tx, dtype=jnp.float64,
                     threshold=row["threshold"])
  step = dense.make_step(config, tx, donate=False)
  batches = kronjax.batch_schedule(jax.random.PRNGKey(grid.seed + 1), n, grid.batch_size,
                                   grid.epochs * per_epoch)
  out = {}
  for t, batch in enumerate(batches, start=1):
    idx = split.train[np.asarray(batch)]
    state, _ = step(state, jnp.asarray(X[idx]), y[idx])
    if t % per_epoch:
      continue
    scores = out.setdefault(t // per_epoch, {})
    for part, held in (("validation", split.val), ("test", split.test)):
      pred = np.asarray(dense.forward(state.params["W"], state.a, state.b, jnp.asarray(X[held]),
                                      state.bias))[:, 0] + shift
      scores.update({f"{part}_{k}": fn(split.labels[held], pred) for k, fn in METRICS.items()})
  return out


LINEAR = dataclasses.replace(GRID, schedule="linear")
VARIANTS = [
    ablation.Variant("defaults", centered=False, thresholds=(None, 0.0), learning_rates=(2.0,)),
    ablation.Variant("centered", centered=True, thresholds=(0.4,), learning_rates=(2.0,)),
    ablation.Variant("decay", centered=True, thresholds=(0.0,), learning_rates=(0.5,),
                     weight_decays=(1e-3, 1e-2)),
    ablation.Variant("bias", centered=True, thresholds=(0.0,), learning_rates=(0.5,),
                     output_bias=True),
]
CASES = [(GRID, v) for v in VARIANTS] + [(LINEAR, VARIANTS[1]), (LINEAR, VARIANTS[2]),
                                         (LINEAR, VARIANTS[3])]


@pytest.mark.parametrize("grid,variant", CASES,
                         ids=[f"{v.name}-{g.schedule}" for g, v in CASES])
def test_sweep_rows_match_dense_sgd(x64, grid, variant):
  """Every row of a sweep, each schedule and variant, equals dense SGD on the materialized
  inputs with the optimizer written out."""
  del x64
  split = _split()
  rows = ablation.sweep_run(grid, variant, split, METRICS)
  members = (len(variant.learning_rates or GRID.learning_rates) * len(variant.thresholds)
             * len(variant.weight_decays)
             * (len(GRID.bias_learning_rates) if variant.output_bias else 1))
  assert len(rows) == members * GRID.epochs
  assert sorted({r["epoch"] for r in rows}) == [1, 2]
  if variant.name == "defaults":
    assert {r["threshold"] for r in rows} == {GRID.default_threshold, 0.0}
  dense_runs = {}
  for row in rows:
    member = (row["learning_rate"], row["threshold"], row["weight_decay"],
              row.get("bias_learning_rate"))
    if member not in dense_runs:
      dense_runs[member] = _dense_scores(split, variant, row, grid)
    for key, value in dense_runs[member][row["epoch"]].items():
      assert abs(row[key] - value) <= 1e-9 * max(abs(value), 1.0), (key, row, value)
    assert row["active_per_step"] >= 0 and row["variant"] == variant.name


def test_grid_from_params_takes_every_field_the_params_have():
  params = types.SimpleNamespace(**dataclasses.asdict(LINEAR), ridge_lambdas=(1.0,))
  assert ablation.Grid.from_params(params) == LINEAR   # the schedule included
  del params.schedule, params.seed
  assert ablation.Grid.from_params(params) == dataclasses.replace(LINEAR, schedule="constant",
                                                                  seed=0)
  params.bias_learning_rates = (0.0,)
  with pytest.raises(ValueError, match="bias_learning_rates must all be > 0"):
    ablation.Grid.from_params(params)


def test_grid_refuses_an_unknown_schedule():
  with pytest.raises(ValueError, match="schedule must be one of .*'cosine'"):
    dataclasses.replace(GRID, schedule="cosine")


def test_baselines_match_a_dense_ridge_solve(x64):
  del x64
  split = _split()
  y = split.labels
  mu = float(np.mean(y[split.train]))
  mean = ablation.mean_baseline(split, METRICS)
  assert mean["test_mse"] == pytest.approx(np.mean((y[split.test] - mu) ** 2), rel=1e-12)
  ridge = ablation.kronrls_baseline(split, METRICS, (0.1, 1.0))
  lams = sorted(r["lambda"] for r in ridge["tuning"])
  lam = ridge["chosen"]["lambda"]
  assert lams[0] < lam < lams[-1]   # the grid is extended until the optimum is inside it
  # The same ridge by a dense solve over the pairs' kernel K[i, j] = Kd[d_i, d_j] Kt[t_i, t_j].
  Kd, Kt = (t @ t.T for t in split.tables)
  pair_kernel = lambda a, b: Kd[np.ix_(a[:, 0], b[:, 0])] * Kt[np.ix_(a[:, 1], b[:, 1])]  # pylint: disable=unnecessary-lambda-assignment
  train = split.pairs[split.train]
  alpha = np.linalg.solve(pair_kernel(train, train) + lam * np.eye(len(train)),
                          y[split.train] - mu)
  for part, idx in (("validation", split.val), ("test", split.test)):
    pred = pair_kernel(split.pairs[idx], train) @ alpha + mu
    for name, fn in METRICS.items():
      assert ridge[f"{part}_{name}"] == pytest.approx(fn(y[idx], pred), rel=1e-5)
  chosen = [r for r in ridge["tuning"] if r["lambda"] == lam]
  assert chosen[0]["score"] == ridge["validation_mse"]


def _rows():
  rows = []
  for variant, b, lr, val in [("centered", 0.0, 1.0, 0.5), ("centered", 0.0, 2.0, 0.3),
                              ("centered", 1.0, 1.0, math.nan), ("centered", 1.0, 2.0, 0.4),
                              ("defaults", 0.0, 1.0, 0.2)]:
    rows.append({"variant": variant, "threshold": b, "learning_rate": lr, "epoch": 1,
                 "validation_mse": val, "test_mse": 10 * val, "validation_ci": 0.6,
                 "test_ci": 0.7, "active_per_step": 5.0 - b})
  return rows


def test_best_skips_non_finite_rows_and_reports_none():
  rows = _rows()
  assert ablation.best(rows, "validation_mse", variant="centered")["validation_mse"] == 0.3
  assert ablation.best(rows, "validation_mse", variant="centered", threshold=1.0)[
      "learning_rate"] == 2.0
  assert ablation.best(rows, "validation_mse", variant="decay") is None


def test_threshold_curve_is_chosen_on_validation():
  curve = ablation.threshold_curve(_rows(), ["mse", "ci"])
  assert [c["threshold"] for c in curve] == [0.0, 1.0]
  assert [c["learning_rate"] for c in curve] == [2.0, 2.0]
  assert curve[0]["test_mse"] == 3.0 and curve[1]["active_per_step"] == 4.0
  assert set(curve[0]) == {"threshold", "learning_rate", "epoch", "validation_mse", "test_mse",
                           "validation_ci", "test_ci", "active_per_step"}


@pytest.mark.slow
def test_options_build_on_the_best_of_the_curve(x64):
  del x64
  options, rows = ablation.option_runs(GRID, _split(), METRICS)
  assert [o["method"] for o in options] == [
      f"kronjax defaults (kronecker init, b = {GRID.default_threshold:.2f})", "kronjax b = 0",
      "kronjax b = 0, centered", "kronjax centered, best b of the curve",
      "kronjax centered, best b, + weight decay",
      "kronjax centered, best b, + output bias (raw labels)"]
  curve = options[3]
  assert curve["validation_mse"] == min(r["validation_mse"] for r in rows
                                        if r["variant"] == "centered")
  for option in options[4:]:
    assert (option["threshold"], option["learning_rate"]) == (curve["threshold"],
                                                               curve["learning_rate"])
  assert {r["variant"] for r in rows} == {"defaults", "centered", "decay", "bias"}


def test_cold_split_holds_out_whole_drugs():
  mod = _module()
  pairs = np.array([(d, t) for d in range(10) for t in range(3)] + [(9, 0)], np.int32)
  train, val, test = mod.cold_drug_split(pairs, 10, seed=3)
  assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(pairs)))
  drugs = [set(pairs[i, 0].tolist()) for i in (train, val, test)]
  assert [len(d) for d in drugs] == [8, 1, 1]
  assert not (drugs[0] & drugs[1]) and not (drugs[0] & drugs[2]) and not (drugs[1] & drugs[2])
  # A handful of drugs still gives every part one.
  assert all(len(part) for part in mod.cold_drug_split(pairs[:9], 3, seed=0))
  with pytest.raises(ValueError, match="n_drugs must be at least 3"):
    mod.cold_drug_split(pairs[:6], 2, seed=0)


@pytest.mark.parametrize("field,value,match", [
    ("drug_features", "ecfp", "drug_features must be 'tanimoto' or 'morgan'"),
    ("validation_fold", 5, "validation_fold must be in"),
    ("learning_rates", (), "learning_rates must list at least one value"),
    ("n_train", 0, "n_train"),
    ("bias_learning_rates", (0.1, 0.0), "bias_learning_rates must all be > 0"),
    ("bias_learning_rates", (), "bias_learning_rates must list at least one value"),
    ("main_effect_weight", -0.5, "main_effect_weight must be a finite number >= 0"),
    ("main_effect_weight", math.nan, "main_effect_weight must be a finite number >= 0"),
])
def test_bad_params(field, value, match):
  with pytest.raises(ValueError, match=match):
    _module().Params(**{field: value})


@pytest.mark.slow
def test_kiba_ablation_smoke(tmp_path, monkeypatch):
  pytest.importorskip("rdkit")
  monkeypatch.chdir(ROOT)   # the smoke config names the fixture relative to the checkout
  experiment.run_config(ROOT / "configs" / "kiba_ablation.toml", smoke=True, out_dir=tmp_path,
                        progress=False, echo=False)
  result = json.loads((tmp_path / "results.json").read_text())
  methods = [row["method"] for row in result["table"]]
  assert methods[:3] == ["training mean", "KronRLS (same features)",
                         "KronRLS, main-effect features"]
  assert len(methods) == 10 and all(m.startswith("kronjax") for m in methods[3:])
  params = result["config"]["params"]
  for regime, r in result["metrics"]["regimes"].items():
    assert r["n_train"] <= params["n_train"] and r["n_val"] <= params["n_eval"]
    for name, m in r["methods"].items():
      assert set(m) >= {"validation_mse", "validation_ci", "test_mse", "test_ci"}, name
    kron = r["methods"]["KronRLS (same features)"]
    assert math.isfinite(kron["test_mse"]) and 0.0 <= kron["test_ci"] <= 1.0
    curve = r["threshold_curve"]
    assert [c["threshold"] for c in curve] == sorted(params["thresholds"]), regime
    chosen = r["methods"]["kronjax centered, best b of the curve"]["chosen"]
    assert any(all(s[k] == v for k, v in chosen.items()) and s["variant"] == "centered"
               for s in r["sweep"])
    # Main-effect features: the curve's b at a half and a quarter of its rate.
    main = r["methods"]["kronjax centered, best b, main-effect features"]["chosen"]
    assert main["threshold"] == chosen["threshold"]
    assert main["learning_rate"] in (chosen["learning_rate"] / 2, chosen["learning_rate"] / 4)
    assert {s["learning_rate"] for s in r["sweep"] if s["variant"] == "main effects"} == {
        chosen["learning_rate"] / 2, chosen["learning_rate"] / 4}
    assert math.isfinite(r["methods"]["KronRLS, main-effect features"]["test_mse"])
  assert (tmp_path / result["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
