"""Tests for the threshold index (``kronjax._src.step.index``): every kind against the scan truth, overflow, rebuilds.

The property test draws >= 200 seeded cases (random P, b, batches and long sequences
of random row updates of random sizes and signs, values on a 1/8 grid so ties at b
and at b - delta happen, plus extreme magnitudes), runs every kind under jit and
under ``jax.vmap`` over 3 independent indexes, and compares each query with a numpy
scan as a set. The integration test trains with ``index="bucketed"`` and checks the
run is bit-for-bit the ``index="scan"`` run in float64.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.step import index as threshold

# (m, n, active capacity, candidate capacity, delta, B, R): small capacities force
# both kinds of overflow; big delta means few rebuilds, tiny delta many.
SHAPES = (
    (97, 11, 12, 40, 0.5, 4, 9),
    (200, 16, 30, 24, 0.125, 5, 17),
    (256, 6, 40, 120, 1.0, 1, 33),
)
CASES_PER_SHAPE = 67          # 3 shapes x 67 seeds = 201 cases, each with STEPS updates
STEPS = 10
VMAP = 3


def _index(kind, m, n, K, C, delta):
  return threshold.make_index(kind, width=m, active_capacity=K, candidate_capacity=C,
                              delta=delta)


@functools.lru_cache(maxsize=None)
def _compiled(kind, m, n, K, C, delta):
  """jit and jit(vmap) versions of build/query/update (each compiles once: _cache_size)."""
  ix = _index(kind, m, n, K, C, delta)
  every = lambda s, P, b, c: ix.update(s, P, b, None, c)
  plain = dict(build=jax.jit(ix.build), query=jax.jit(ix.query), rows=jax.jit(ix.update),
               all=jax.jit(every))
  vmapped = dict(build=jax.jit(jax.vmap(ix.build)), query=jax.jit(jax.vmap(ix.query)),
                 rows=jax.jit(jax.vmap(ix.update)), all=jax.jit(jax.vmap(every)))
  return plain, vmapped


def _draw_problem(rng, m, n, R, B, kinds):
  """A P, b and a sequence of updates; values on a 1/8 grid (ties), some extreme rows."""
  b = rng.integers(-4, 12) / 8.0
  P = np.round(rng.normal(0.5, 1.0, (m, n)) * 8) / 8
  P[rng.random((m, n)) < 0.05] = b                          # ties exactly at b
  extreme = rng.random(m) < 0.03
  P[extreme] *= rng.choice([1e6, 1e-6, -1e6], size=(int(extreme.sum()), 1))
  steps = []
  for every_row in kinds:
    scale = rng.choice([2.0 ** -20, 1 / 8, 1.0, 4.0])
    if every_row:                                  # every row (the dense update path)
      dP = np.round(rng.normal(0, scale, (m, n)) * 8) / 8 * (rng.random((m, 1)) < 0.3)
      steps.append(("all", np.zeros(R, np.int64), dP))
    else:
      rows = rng.integers(0, m + 1, R)                      # duplicates and padding (= m)
      dP = rng.normal(0, scale, (R, n))
      dP = np.where(rng.random((R, 1)) < 0.5, np.round(dP * 8) / 8, dP)
      dP *= rng.choice([-1.0, 1.0], size=(R, 1))
      steps.append(("rows", rows, dP))
    steps[-1] += (rng.integers(0, n, B), rng.random() < 0.15)  # batch, query with another b
  return P.astype(np.float32), np.float32(b), steps


def _apply(P, step):
  """``P + dP`` in float32 (duplicate rows add in turn, padding dropped) and the bounds."""
  kind, rows, dP = step[:3]
  dP = dP.astype(np.float32)
  if kind == "all":
    return P + dP, np.max(np.abs(dP), axis=1)
  P = P.copy()
  keep = rows < P.shape[0]
  np.add.at(P, rows[keep], dP[keep])
  return P, np.max(np.abs(dP), axis=1)


def _check(kind, P, b, q, j_batch, K, C, state, P_at_rebuild, lo):
  m = P.shape[0]
  idx, count, overflow = q
  truths = P[:, j_batch] > b
  for i, j in enumerate(j_batch):
    truth = np.flatnonzero(truths[:, i])
    expect_over = len(truth) > K
    if kind == "bucketed":
      if P_at_rebuild is not None:  # the bucket sizes are those of P at the last rebuild
        assert int(state.cand_count[j]) == int(np.sum(P_at_rebuild[:, j] > lo))
      # A query with another b falls back to the exact scan (no candidate overflow).
      if b == float(state.b):
        expect_over |= int(state.cand_count[j]) > C
    assert overflow[i] == expect_over, (i, len(truth), count[i])
    assert idx[i].shape == (K,)
    got = idx[i][idx[i] < m]
    assert np.all(idx[i][len(got):] == m), "padding must be m, after the indices"
    if overflow[i]:
      assert count[i] > K
      assert set(got) <= set(truth)
    else:
      assert count[i] == len(truth)
      np.testing.assert_array_equal(got, truth)             # ascending and the same set


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=[f"m{s[0]}" for s in SHAPES])
def test_every_query_equals_the_dense_truth(shape):
  m, n, K, C, delta, B, R = shape
  for seed in range(CASES_PER_SHAPE):
    rng = np.random.default_rng([seed, m])
    kinds = rng.random(STEPS) < 0.2   # every row (dense path) or a few rows, shared by the 3
    problems = [_draw_problem(rng, m, n, R, B, kinds) for _ in range(VMAP)]
    for kind in threshold.KINDS:
      plain, vmapped = _compiled(kind, m, n, K, C, delta)
      Ps = [p[0] for p in problems]
      bs = np.stack([p[1] for p in problems])
      state = plain["build"](Ps[0], bs[0])
      vstate = vmapped["build"](np.stack(Ps), bs)
      rebuild_P = [P.copy() for P in Ps]
      rebuilds = int(state.rebuilds)
      for t in range(STEPS):
        changes = [_apply(Ps[k], problems[k][2][t]) for k in range(VMAP)]
        Ps = [c[0] for c in changes]
        bounds = np.stack([c[1] for c in changes])
        step_kind, _, _, _, other_b = problems[0][2][t]
        if step_kind == "all":
          state = plain["all"](state, Ps[0], bs[0], bounds[0])
          vstate = vmapped["all"](vstate, np.stack(Ps), bs, bounds)
        else:
          rows = np.stack([problems[k][2][t][1] for k in range(VMAP)]).astype(np.int32)
          state = plain["rows"](state, Ps[0], bs[0], rows[0], bounds[0])
          vstate = vmapped["rows"](vstate, np.stack(Ps), bs, rows, bounds)
        # The rebuild counter moves by at most one per update, and only when it must.
        new_rebuilds = int(state.rebuilds)
        assert new_rebuilds - rebuilds in (0, 1)
        if new_rebuilds > rebuilds:
          rebuild_P[0] = Ps[0].copy()
        rebuilds = new_rebuilds
        qb = bs + np.float32(0.125) * (1 if t % 2 else -1) if other_b else bs
        qb = qb.astype(np.float32)
        batches = np.stack([problems[k][2][t][3] for k in range(VMAP)]).astype(np.int32)
        q = plain["query"](state, Ps[0], batches[0], qb[0])
        vq = vmapped["query"](vstate, np.stack(Ps), batches, qb)
        lo = None if kind == "scan" else np.float32(bs[0] - np.float32(delta))
        q, vq, host, vhost = jax.device_get((q, vq, state, vstate))
        _check(kind, Ps[0], qb[0], q, batches[0], K, C, host,
               rebuild_P[0] if kind == "bucketed" else None, lo)
        for k in range(VMAP):
          qk = threshold.QueryResult(*(x[k] for x in vq))
          sk = jax.tree.map(lambda x, k=k: x[k], vhost)
          _check(kind, Ps[k], qb[k], qk, batches[k], K, C, sk, None, lo)
          if k == 0:  # vmap over independent indexes = the unbatched index
            for a, bb in zip(qk, q):
              np.testing.assert_array_equal(a, bb)
  for kind in threshold.KINDS:  # no retrace across seeds, values, b, rebuilds
    for fns in _compiled(kind, m, n, K, C, delta):
      assert {name: f._cache_size() for name, f in fns.items()} == dict.fromkeys(fns, 1)


@pytest.mark.parametrize("kind", threshold.KINDS)
def test_query_and_update_trace_once(kind):
  m, n, K = 64, 5, 16
  ix = _index(kind, m, n, K, 32, 0.25)
  query = jax.jit(chex.assert_max_traces(ix.query, n=1))
  update = jax.jit(chex.assert_max_traces(ix.update, n=1))
  rng = np.random.default_rng(1)
  state = ix.build(jnp.zeros((m, n), jnp.float32), jnp.float32(0.5))
  for t in range(4):
    P = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    state = update(state, P, jnp.float32(0.5), jnp.asarray(rng.integers(0, m, 7), jnp.int32),
                   jnp.full((7,), 10.0 ** (t - 2), jnp.float32))
    query(state, P, jnp.asarray(rng.integers(0, n, 3), jnp.int32), jnp.float32(0.5 + t))
  chex.clear_trace_counter()


def test_rebuilds_count_and_certify():
  """Small drift: no rebuild; drift reaching delta: exactly one; padding rows are ignored."""
  m, n = 50, 4
  ix = _index("bucketed", m, n, 50, 50, 0.5)
  P = jnp.zeros((m, n), jnp.float32).at[3].set(1.0)
  b = jnp.float32(0.75)
  state = ix.build(P, b)
  assert int(state.rebuilds) == 0 and int(state.cand_count[0]) == 1
  rows = jnp.array([5, m, 5], jnp.int32)
  state = ix.update(state, P, b, rows, jnp.array([0.2, 100.0, 0.2], jnp.float32))
  assert int(state.rebuilds) == 0                            # 0.4 < 0.5, padding ignored
  state = ix.update(state, P, b, rows, jnp.array([0.05, 0.0, 0.05], jnp.float32))
  assert int(state.rebuilds) == 1                            # 0.5 + rounding margin >= 0.5
  assert float(state.max_drift) == 0.0
  state = ix.update(state, P, b, None, jnp.full((m,), 0.1, jnp.float32))
  assert int(state.rebuilds) == 1


def test_candidate_overflow_is_reported_with_an_upper_bound():
  m, n = 40, 3
  ix = _index("bucketed", m, n, 10, 4, 0.25)
  P = jnp.full((m, n), -1.0, jnp.float32).at[:6, 0].set(0.9).at[:2, 1].set(2.0)
  b = jnp.float32(1.0)
  state = ix.build(P, b)
  q = ix.query(state, P, jnp.array([0, 1, 2], jnp.int32), b)
  np.testing.assert_array_equal(np.asarray(q.overflow), [True, False, False])
  assert int(q.count[0]) > 10 and int(q.count[1]) == 2
  assert int(threshold.needed_candidate_capacity(state)) == 6


def test_dense_compaction_matches_nonzero():
  rng = np.random.default_rng(0)
  for L, B, cap in ((1, 1, 1), (300, 3, 7), (1024, 2, 1024), (513, 1, 40)):
    mask = rng.random((B, L)) < 0.3   # compact_columns takes it column-wise, (L, B)
    idx, count = jax.jit(threshold.compact_columns, static_argnums=(1, 2))(jnp.asarray(mask.T),
                                                                           cap, L)
    for i in range(B):
      expect = np.flatnonzero(mask[i])[:cap]
      np.testing.assert_array_equal(np.asarray(idx[i]),
                                    np.concatenate([expect, np.full(cap - len(expect), L)]))
      assert int(count[i]) == mask[i].sum()


def test_auto_kind_and_bad_kind():
  # Measured: the dense scan gives the faster train step at every width (the performance page),
  # so the plan's index="auto" resolves to it.
  for k in (8, 12, 16, 18):
    for update in ("auto", "sparse"):
      plan = kronjax.Plan(update=update).resolve(kronjax.Config(width=2**k))
      assert plan.index == "scan", (k, update)
  assert set(threshold.KINDS) == {"scan", "bucketed"}
  with pytest.raises(ValueError, match="index kind"):
    _index("tree", 8, 2, 4, 4, 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("tx, update", [(optax.sgd(0.5), "sparse"),
                                        (optax.sgd(0.3, momentum=0.9), "full")])
def test_training_bucketed_is_bit_for_bit_scan(tx, update):
  with jax.enable_x64(True):
    data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 48, (4, 5, 3),
                                        task="classification", num_classes=3, rank=2)
    runs = {}
    dataset = kronjax.Dataset(data, labels)
    for kind in ("scan", "bucketed"):
      # One layout for both (a bucketed index needs neuron-major P): then only the
      # index differs, and the point-major step's own kernels (kronjax's row kernels) do
      # not change the summation order of the forward pass.
      cfg = kronjax.Config(width=96, loss="softmax", num_classes=3, train_output=True,
                           threshold=0.5)
      plan = kronjax.Plan(update=update, index=kind, index_delta=0.05, layout="neurons")
      state = kronjax.init(jax.random.PRNGKey(1), cfg, dataset, tx, plan=plan)
      step = jax.jit(kronjax.train_step)
      rng = np.random.default_rng(0)
      losses = []
      for _ in range(30):
        state, metrics = step(state, dataset,
                              jnp.asarray(rng.choice(48, 8, replace=False), jnp.int32))
        assert not bool(metrics["overflow"])
        losses.append(float(metrics["loss"]))
      runs[kind] = (losses, np.asarray(state.P), np.asarray(state.a), int(metrics["index_rebuilds"]))
    assert runs["scan"][0] == runs["bucketed"][0]
    np.testing.assert_array_equal(runs["scan"][1], runs["bucketed"][1])
    np.testing.assert_array_equal(runs["scan"][2], runs["bucketed"][2])
    assert runs["bucketed"][3] > 0, "the run should exercise the lazy rebuild"


@pytest.mark.parametrize("kind", threshold.KINDS)
def test_every_kind_returns_sorted_unique_ids_padded_with_m(kind):
  # The step's scatters promise XLA sorted, unique neuron ids (copy-free loops):
  # an index that broke the promise would corrupt the update silently.
  m, n, K, C = 200, 16, 60, 120
  P = jax.random.normal(jax.random.PRNGKey(3), (m, n))
  b = jnp.asarray(0.8, P.dtype)
  ix = _index(kind, m, n, K, C, 0.25)
  q = ix.query(ix.build(P, b), P, jnp.arange(n), b)
  idx = np.asarray(q.idx)
  for i in range(n):
    row = idx[i]
    valid = row[row < m]
    assert np.all(row[len(valid):] == m), "padding must follow the ids"
    assert np.all(np.diff(valid) > 0), "ids must be strictly ascending (sorted, unique)"
    np.testing.assert_array_equal(valid, np.flatnonzero(np.asarray(P[:, i]) > float(b)))
