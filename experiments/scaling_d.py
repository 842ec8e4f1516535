"""Step time of kronjax and of the dense baseline vs the input dimension d (and init time).

At fixed width m, n training points and batch B, for d = 2**k (two factors of
2**(k//2) and 2**(k - k//2)), measures with ``kronjax.experiments.timing.time_steps``:

* the kronjax step (``kronjax.jit_train_step``: jit, donated state; precomputed Gram):
  it never touches d, so its time should be flat;
* the dense baseline step (``kronjax.dense.make_step``: ``X (B, d) @ W^T`` and
  the ``(m, d)`` gradient), skipped and marked where ``W`` and its gradient
  (``2 m d`` floats, plus the batch) would exceed ``dense_max_bytes``;
* init time (``kronjax.experiments.timing.time_fn`` of a jitted ``kronjax.init``):
  explicit (``W0`` drawn in chunks, ``O(m n d)``, skipped above
  ``explicit_max_d``) vs implicit (``P0 ~ N(0, K)``, no d). The dataset is built
  with ``gram="factors"`` for this, so the Gram of the factors is computed
  inside the implicit init (and the explicit one needs none).

Writes ``scaling_d.png`` (log-log step time and init time vs d).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import runner as xp
from kronjax.experiments import timing


@dataclasses.dataclass(frozen=True)
class Params:
  """scaling_d settings (see configs/scaling_d.toml)."""
  seed: int = 0
  log2_d: tuple[int, ...] = (8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)
  width: int = 2048
  n: int = 256
  batch_size: int = 32
  lr: float = 1.0
  steps: int = 20                  # timed steps per d (after warmup)
  warmup: int = 3
  dense_steps: int = 5             # timed dense steps per d (after 2 warmup)
  dense_max_bytes: int = 4 * 2**30   # skip dense where 4 * (2 m d + B d) exceeds this
  init_repeats: int = 3
  explicit_max_d: int = 2**16      # explicit init is O(m n d): skipped above this d

  def __post_init__(self):
    if not self.log2_d or min(self.log2_d) < 2:
      raise ValueError(f"log2_d must be a non-empty list of ints >= 2, got {list(self.log2_d)}.")
    xp.require_positive(self, "width", "n", "batch_size", "steps", "dense_steps", "init_repeats")
    if self.batch_size > self.n:
      raise ValueError(f"batch_size must be <= n={self.n}, got {self.batch_size}.")


def dims_for(k: int) -> tuple[int, int]:
  return (2 ** (k // 2), 2 ** (k - k // 2))


def dense_bytes(p: Params, d: int) -> int:
  """Bytes the dense step holds at least: W and its gradient (m x d each) and the batch."""
  return 4 * (2 * p.width * d + p.batch_size * d)


def measure(p: Params, k: int, plan: kronjax.Plan | None = None) -> dict:
  dims = dims_for(k)
  d = math.prod(dims)
  key = jax.random.PRNGKey(p.seed)
  k_data, k_init, k_fit = jax.random.split(key, 3)
  data, labels = kronjax.data.planted(k_data, p.n, dims, dtype=jnp.float32)
  tx = optax.sgd(p.lr)  # equal optimizers share one compiled step across d
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=p.width, init="implicit")
  state = kronjax.init(k_init, config, dataset, tx, plan=plan)
  batches = [jnp.asarray(b) for b in kronjax.batch_schedule(k_fit, p.n, p.batch_size,
                                                            p.warmup + p.steps)]
  kron_t, state = timing.time_steps(lambda s, b: kronjax.jit_train_step(s, dataset, b), state,
                                    batches, warmup=p.warmup)
  row = {"log2_d": k, "d": d, "kronjax_step": kron_t}

  # Init times (each compiled once, then timed): kronjax.init with the Gram computed inside.
  m = p.width
  factors = kronjax.Dataset(data, labels, gram="factors")
  row["init_implicit"] = timing.time_fn(_init_fn(m, "implicit", tx, plan), k_init, factors,
                                        warmup=1, repeats=p.init_repeats)
  if d <= p.explicit_max_d:
    row["init_explicit"] = timing.time_fn(_init_fn(m, "explicit", tx, plan), k_init, factors,
                                          warmup=1, repeats=p.init_repeats)
  else:
    row["init_explicit"] = None

  need = dense_bytes(p, d)
  row["dense_bytes"] = need
  if need <= p.dense_max_bytes:
    dense_config = kronjax.Config(width=m)
    dstate = kronjax.dense.init(k_init, dense_config, dims, tx, dtype=jnp.float32)
    dstep = kronjax.dense.make_step(dense_config, tx)
    X = data.materialize()
    batch_data = [(X[b], labels[b]) for b in batches[:2 + p.dense_steps]]
    dense_t, dstate = timing.time_steps(lambda s, xy: dstep(s, *xy), dstate, batch_data, warmup=2)
    del dstate, X
    row["dense_step"] = dense_t
  else:
    row["dense_step"] = None
  return row


def _init_fn(width: int, init: str, tx: optax.GradientTransformation,
             plan: kronjax.Plan | None = None):
  """``jit(key, dataset -> kronjax.init(...).projections)``: the initial projections, timed."""
  config = kronjax.Config(width=width, init=init)
  return jax.jit(lambda key, dataset: kronjax.init(key, config, dataset, tx, plan=plan).projections)


def run(p: Params, out_dir: pathlib.Path, *, progress: bool,
        plan: kronjax.Plan | None = None) -> dict:
  rows = []
  ks = sorted(p.log2_d)
  it = ks
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(ks, desc="scaling_d", unit="d")
  for k in it:
    rows.append(measure(p, k, plan))
    if progress:
      it.set_postfix(d=f"2**{k}", kron_ms=f"{1000 * rows[-1]['kronjax_step']['median_s']:.2f}")

  table, timings = [], {}
  for r in rows:
    kron = r["kronjax_step"]["median_s"]
    dense = r["dense_step"]["median_s"] if r["dense_step"] else None
    table.append({
        "d": f"2**{r['log2_d']}",
        "kronjax ms/step": 1000 * kron,
        "kronjax p10-p90 ms": f"{1000 * r['kronjax_step']['p10_s']:.2f}-{1000 * r['kronjax_step']['p90_s']:.2f}",
        "dense ms/step": 1000 * dense if dense else f"skipped (needs {_bytes(r['dense_bytes'])})",
        "dense / kronjax": dense / kron if dense else None,
        "init implicit ms": 1000 * r["init_implicit"]["median_s"],
        "init explicit ms": (1000 * r["init_explicit"]["median_s"] if r["init_explicit"]
                             else "skipped (O(m n d))"),
    })
    timings[f"2**{r['log2_d']}"] = {k: v for k, v in r.items() if k not in ("log2_d", "d")}

  kron_ms = np.array([1000 * r["kronjax_step"]["median_s"] for r in rows])
  ran = [r for r in rows if r["dense_step"]]
  metrics = {
      "width": p.width, "n": p.n, "batch_size": p.batch_size, "log2_d": ks,
      "kronjax_ms": kron_ms.tolist(),
      "kronjax_ms_max_over_min": float(kron_ms.max() / kron_ms.min()),
      "dense_ms": [1000 * r["dense_step"]["median_s"] if r["dense_step"] else None for r in rows],
      "dense_largest_log2_d": max((r["log2_d"] for r in ran), default=None),
      "dense_skipped_log2_d": [r["log2_d"] for r in rows if not r["dense_step"]],
      "dense_max_bytes": p.dense_max_bytes,
      "speedup": {f"2**{r['log2_d']}": r["dense_step"]["median_s"] / r["kronjax_step"]["median_s"]
                  for r in ran},
      "init_implicit_ms": [1000 * r["init_implicit"]["median_s"] for r in rows],
      "init_explicit_ms": [1000 * r["init_explicit"]["median_s"] if r["init_explicit"] else None
                           for r in rows],
  }
  plots = [_plot(out_dir, rows, p)]
  return {"metrics": metrics, "table": table, "plots": plots, "timings": timings}


def _plot(out_dir: pathlib.Path, rows: list, p: Params) -> str:
  """Log-log step time and init time vs d. The legends sit below the axes, so they never
  cover a marker; the dense runs skipped for memory are crosses along the top, labelled."""
  plt = xp.pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
  d = np.array([r["d"] for r in rows], float)
  kron = np.array([1000 * r["kronjax_step"]["median_s"] for r in rows])
  ax.loglog(d, kron, "o-", label="kronjax (implicit init, precomputed Gram)")
  dense = [(r["d"], 1000 * r["dense_step"]["median_s"]) for r in rows if r["dense_step"]]
  if dense:
    ax.loglog(*zip(*dense), "s-", label="dense baseline")
  skipped = [r["d"] for r in rows if not r["dense_step"]]
  if skipped:
    top = max([kron.max()] + [t for _, t in dense])
    ax.loglog(skipped, [top] * len(skipped), "x", color="C1", ms=9,
              label=f"dense skipped: W and its gradient need > {p.dense_max_bytes / 2**30:g} GiB")
    ax.set_ylim(top=top * 4)  # room above the crosses
  ax.set_xlabel("input dimension d")
  ax.set_ylabel("ms per step (median)")
  ax.set_title(f"step time, m={p.width}, n={p.n}, B={p.batch_size}", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
  imp = np.array([1000 * r["init_implicit"]["median_s"] for r in rows])
  ax2.loglog(d, imp, "o-", label="implicit (P0 ~ N(0, K))")
  exp = [(r["d"], 1000 * r["init_explicit"]["median_s"]) for r in rows if r["init_explicit"]]
  if exp:
    ax2.loglog(*zip(*exp), "s-", label=f"explicit (W0 in chunks; run up to d = {p.explicit_max_d})")
  ax2.set_xlabel("input dimension d")
  ax2.set_ylabel("ms (median)")
  ax2.set_title(f"init time, m={p.width}, n={p.n}", fontsize=10)
  ax2.grid(alpha=0.3, which="both")
  ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
  return xp.save_figure(fig, out_dir, "scaling_d.png")


def replot(out_dir: str | pathlib.Path) -> str:
  """Redraws ``scaling_d.png`` in ``out_dir`` from its ``results.json`` (no measuring)."""
  import json  # pylint: disable=g-import-not-at-top
  out_dir = pathlib.Path(out_dir)
  result = json.loads((out_dir / "results.json").read_text())
  p = Params(**{k: tuple(v) if isinstance(v, list) else v
                for k, v in result["config"]["params"].items()})
  rows = [{"log2_d": k, "d": math.prod(dims_for(k)), **result["timings"][f"2**{k}"]}
          for k in sorted(p.log2_d)]
  return _plot(out_dir, rows, p)


def _bytes(n: int) -> str:
  return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.0f} MiB"


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 3 or sys.argv[1] != "--replot":
    sys.exit("usage: python experiments/scaling_d.py --replot DIR   (redraws DIR/scaling_d.png "
             "from DIR/results.json; run the experiment with `kronjax run configs/scaling_d.toml`)")
  print(pathlib.Path(sys.argv[2]) / replot(sys.argv[2]))
