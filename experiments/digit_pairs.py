"""Real data: "do these handwritten digits show the same number?" on Kronecker inputs.

scikit-learn's bundled digits (1797 8x8 images, shipped inside the package; no
download). The images are split into two DISJOINT sets (stratified by digit):
training pairs are built only from training images, test pairs only from test
images. Each image is centered (minus the training images' mean pixel values)
and scaled to unit norm, so the input ``x = u ⊗ v`` (``d = 64**2 = 4096``; with
``images_per_input = 3`` it is ``u ⊗ v ⊗ w``, ``d = 64**3 = 262144``) has unit
norm as the theory assumes. The label is 1 when all images of the input show the
same digit; a fraction ``same_fraction`` of the inputs is sampled that way, so
the classes are balanced (a uniform sample would be ~90% "different").

Compared on the same inputs, the same batches and the same number of epochs:

  * kronjax (softmax, 2 classes), d-free: it never forms ``x``;
  * the dense baseline ``kronjax.dense`` on the materialized ``(n, d)`` inputs,
    where its weights and inputs fit in ``dense_max_bytes`` (d = 4096 does;
    d = 262144 is skipped and marked). With ``init = "explicit"`` both start
    from the same ``W0`` and compute the same SGD steps, so their accuracies
    must agree up to float32 rounding;
  * logistic regression (scikit-learn) on the same Kronecker features where they
    fit, and on the pairwise ``|u - v|`` features (always).

Time per epoch is (median step time after compilation) x (steps per epoch), both
networks timed step by step with ``kronjax.experiments.timing.time_steps``. kronjax's step
also keeps the registered test points' projections up to date (so test accuracy
is free at the end), which the dense baseline does not pay for.

Shapes: n training inputs, n_t test inputs, m neurons, d input dimension.

    kronjax run configs/digit_pairs.toml [--smoke]
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import runner as experiment
from kronjax.experiments import timing as bench

PIXELS = 64


@dataclasses.dataclass(frozen=True)
class Params:
  """Task, network and baselines."""
  images_per_input: int = 2
  train_inputs: int = 4096
  test_inputs: int = 2048
  same_fraction: float = 0.5
  test_image_fraction: float = 0.5
  width: int = 4096
  threshold: float | None = None      # None: the paper's sqrt(0.4 ln m)
  learning_rate: float = 128.0
  batch_size: int = 32
  epochs: int = 10
  train_output: bool = False
  init: str = "auto"                  # auto: explicit (same W0 as dense) when d <= 2**14
  dense_baseline: bool = True
  dense_max_bytes: int = 2 * 2**30
  logreg: bool = True
  logreg_C: float = 1.0
  logreg_max_iter: int = 500
  seed: int = 0


# -- data.

def load_images(p: Params, rng: np.random.Generator):
  """Preprocessed train/test images ``(N, 64)`` with labels, from disjoint image sets."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = digits.data.astype(np.float64)
  labels = digits.target.astype(np.int64)
  tr, te = train_test_split(np.arange(len(labels)), test_size=p.test_image_fraction,
                            stratify=labels, random_state=int(rng.integers(2**31)))
  mean = images[tr].mean(axis=0)

  def prep(idx):
    x = images[idx] - mean
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels[idx]

  return prep(tr), prep(te), (tr, te)


def sample_inputs(labels: np.ndarray, count: int, k: int, same_fraction: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """``(count, k)`` image indices and ``(count,)`` labels (1: all k images show one digit)."""
  by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
  classes = np.array(sorted(by_class))
  n_same = int(round(same_fraction * count))
  rows = []
  for _ in range(n_same):
    c = rng.choice(classes)
    rows.append(rng.choice(by_class[c], size=k, replace=False))
  while len(rows) < count:
    cand = rng.choice(len(labels), size=k, replace=False)
    if len(set(labels[cand])) > 1:
      rows.append(cand)
  idx = np.asarray(rows)
  y = np.asarray([len(set(labels[r])) == 1 for r in idx], np.int32)
  perm = rng.permutation(count)
  return idx[perm], y[perm]


def abs_diff_features(factors: list[np.ndarray]) -> np.ndarray:
  """Concatenated ``|u_a - u_b|`` over all image pairs of the input: ``(n, 64 * C(k, 2))``."""
  return np.concatenate([np.abs(a - b) for a, b in itertools.combinations(factors, 2)], axis=1)


# -- models.

def batch_list(p: Params, n: int, rng: np.random.Generator) -> tuple[list[jax.Array], int]:
  per_epoch = n // p.batch_size
  order = np.concatenate([rng.permutation(n)[:per_epoch * p.batch_size] for _ in range(p.epochs)])
  batches = [jnp.asarray(order[i * p.batch_size:(i + 1) * p.batch_size], jnp.int32)
             for i in range(per_epoch * p.epochs)]
  return batches, per_epoch


_OVERFLOW = ("a step overflowed the active capacity; raise it with --set plan.active_capacity=... "
             "(or --set plan.update=full, which has no capacity).")


def train_kronjax(p: Params, config, train, y_train, test, y_test, batches, key, plan=None):
  dataset = kronjax.Dataset(train, y_train, eval_data=test, eval_labels=y_test)
  state = kronjax.init(key, config, dataset, optax.sgd(p.learning_rate), plan=plan)
  overflow = []

  def counted(state, batch):
    state, metrics = kronjax.jit_train_step(state, dataset, batch)
    overflow.append(metrics["overflow"])
    if len(overflow) % 64 == 0 and bool(jnp.any(jnp.stack(overflow[-64:]))):
      raise kronjax.CapacityError(_OVERFLOW)
    return state, metrics

  timing, state = bench.time_steps(counted, state, batches, warmup=3)
  if bool(jnp.any(jnp.stack(overflow))):
    raise kronjax.CapacityError(_OVERFLOW)
  ev = jax.device_get(kronjax.evaluate(state, dataset))
  return {"test_accuracy": float(ev["eval_accuracy"]), "test_loss": float(ev["eval_loss"]),
          "train_accuracy": float(ev["train_accuracy"]), "train_loss": float(ev["train_loss"]),
          "active_capacity": state.resolved_plan.active_capacity, "init": config.init,
          "active_final_mean": float(jnp.mean(jnp.sum(state.P > state.b, axis=0)))}, timing


def train_dense(p: Params, config, train, y_train, test, y_test, batches, key):
  X = train.materialize()
  X_test = test.materialize()
  y_train = jnp.asarray(y_train)
  state = kronjax.dense.init(key, config, train.dims, optax.sgd(p.learning_rate))
  step = kronjax.dense.make_step(config, optax.sgd(p.learning_rate))
  timing, state = bench.time_steps(lambda s, idx: step(s, X[idx], y_train[idx]), state, batches,
                                   warmup=3)
  ev = jax.device_get(kronjax.dense.evaluate(state, config, X_test, jnp.asarray(y_test)))
  ev_train = jax.device_get(kronjax.dense.evaluate(state, config, X, y_train))
  return {"test_accuracy": float(ev["accuracy"]), "test_loss": float(ev["loss"]),
          "train_accuracy": float(ev_train["accuracy"]), "train_loss": float(ev_train["loss"])}, timing


def fit_logreg(p: Params, F_train, y_train, F_test, y_test) -> tuple[dict, dict]:
  from sklearn.linear_model import LogisticRegression
  clf = LogisticRegression(C=p.logreg_C, max_iter=p.logreg_max_iter)
  timing = bench.time_fn(lambda: clf.fit(F_train, y_train), warmup=0, repeats=1)
  return {"test_accuracy": float(clf.score(F_test, y_test)),
          "train_accuracy": float(clf.score(F_train, y_train))}, timing


# -- the experiment.

def plot(rows: list[dict], out_dir: pathlib.Path, title: str, name: str = "digit_pairs.png") -> str:
  plt = experiment.pyplot()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
  names = [r["model"] for r in rows]
  colors = [f"C{i}" for i in range(len(rows))]
  acc = [r["test_accuracy"] if r["test_accuracy"] is not None else 0.0 for r in rows]
  ax0.barh(names, acc, color=colors)
  for i, r in enumerate(rows):
    ax0.text(0.01, i, "skipped: does not fit" if r["test_accuracy"] is None
             else f"{r['test_accuracy']:.3f}", va="center", fontsize=8, color="white"
             if r["test_accuracy"] else "black")
  ax0.axvline(0.5, color="gray", ls="--", lw=1)
  ax0.set(xlim=(0, 1), xlabel="test accuracy (disjoint test images)", title="Test accuracy")
  timed = [(r["model"], r["seconds_per_epoch"]) for r in rows if r.get("seconds_per_epoch")]
  ax1.barh([t[0] for t in timed], [t[1] for t in timed], color=[
      colors[names.index(t[0])] for t in timed])
  ax1.set(xscale="log", xlabel="seconds per epoch (networks) / fit (log. regression)",
          title="Training time")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return experiment.save_figure(fig, out_dir, name, dpi=80)


def run(params: Params, out_dir: pathlib.Path, *, progress: bool = False,
        plan: kronjax.Plan | None = None) -> dict:
  out_dir = pathlib.Path(out_dir)
  p = params
  if p.images_per_input < 2:
    raise ValueError(f"images_per_input must be >= 2 (a pair), got {p.images_per_input}.")
  rng = np.random.default_rng(p.seed)
  (img_tr, lab_tr), (img_te, lab_te), (tr_ids, te_ids) = load_images(p, rng)
  k = p.images_per_input
  d = PIXELS ** k
  idx_tr, y_tr = sample_inputs(lab_tr, p.train_inputs, k, p.same_fraction, rng)
  idx_te, y_te = sample_inputs(lab_te, p.test_inputs, k, p.same_fraction, rng)
  f_tr = [img_tr[idx_tr[:, q]] for q in range(k)]
  f_te = [img_te[idx_te[:, q]] for q in range(k)]
  train = kronjax.KronData(tuple(jnp.asarray(f) for f in f_tr))
  test = kronjax.KronData(tuple(jnp.asarray(f) for f in f_te))
  init = p.init if p.init != "auto" else ("explicit" if d <= 2**14 else "implicit")
  config = kronjax.Config(width=p.width, threshold=p.threshold, loss="softmax", num_classes=2,
                          init=init, train_output=p.train_output)
  key = jax.random.PRNGKey(p.seed)
  batches, per_epoch = batch_list(p, p.train_inputs, rng)
  rows, timings = [], {}

  def add(model, result, timing, per_epoch_steps=None, note=""):
    row = {"model": model, "test_accuracy": None if result is None else result["test_accuracy"],
           "train_accuracy": None if result is None else result["train_accuracy"],
           "seconds_per_epoch": None, "note": note}
    if timing is not None:
      timings[model] = timing
      row["seconds_per_epoch"] = (timing["median_s"] * per_epoch_steps if per_epoch_steps
                                  else timing["median_s"])
    rows.append(row)
    if progress:
      print(f"digit_pairs: {model}: {row}", flush=True)
    return row

  res_k, t_k = train_kronjax(p, config, train, y_tr, test, y_te, batches, key, plan)
  add(f"kronjax (m={p.width}, {init} init)", res_k, t_k, per_epoch)
  dense_bytes = 4 * d * (p.width + p.train_inputs + p.test_inputs)
  res_d = None
  if p.dense_baseline and dense_bytes <= p.dense_max_bytes:
    res_d, t_d = train_dense(p, config, train, y_tr, test, y_te, batches, key)
    add(f"dense baseline (m={p.width})", res_d, t_d, per_epoch)
  else:
    add(f"dense baseline (m={p.width})", None, None,
        note=f"skipped: W and inputs need {dense_bytes / 2**30:.1f} GiB > dense_max_bytes")
  if p.logreg:
    kron_bytes = 8 * d * (p.train_inputs + p.test_inputs)
    if kron_bytes <= p.dense_max_bytes:
      res, t = fit_logreg(p, np.asarray(train.materialize()), y_tr, np.asarray(test.materialize()), y_te)
      add("logistic regression on x = u⊗v" + ("⊗w" if k == 3 else ""), res, t,
          note="seconds_per_epoch is the whole fit")
    else:
      add("logistic regression on Kronecker x", None, None,
          note=f"skipped: features need {kron_bytes / 2**30:.1f} GiB")
    res, t = fit_logreg(p, abs_diff_features(f_tr), y_tr, abs_diff_features(f_te), y_te)
    add("logistic regression on |u - v|", res, t, note="seconds_per_epoch is the whole fit")
  title = (f"digit_pairs: {k} images per input (d = {d}), {p.train_inputs} train / "
           f"{p.test_inputs} test inputs from disjoint images, {p.epochs} epochs")
  plots = [plot(rows, out_dir, title)]
  measured = [r for r in rows if r["test_accuracy"] is not None]
  best = max(measured, key=lambda r: r["test_accuracy"])
  metrics = {
      "d": d, "images_per_input": k, "train_images": len(tr_ids), "test_images": len(te_ids),
      "disjoint_images": bool(not set(tr_ids.tolist()) & set(te_ids.tolist())),
      "train_same_fraction": float(y_tr.mean()), "test_same_fraction": float(y_te.mean()),
      "steps_per_epoch": per_epoch, "kronjax": res_k, "dense": res_d, "models": rows,
      "best_model": best["model"], "best_test_accuracy": best["test_accuracy"],
      "kronjax_minus_dense_test_accuracy": (None if res_d is None
                                            else res_k["test_accuracy"] - res_d["test_accuracy"]),
  }
  return {"metrics": metrics, "table": rows, "plots": plots, "timings": timings}
