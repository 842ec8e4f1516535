"""Momentum and weight decay applied from the gradient's factors (``optim.update_form``,
``step._apply_factored``): exact against dense SGD, and no full-size temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import sweep as sw
from kronjax._src.kernels import dispatch
from kronjax._src.step import dense
from kronjax._src.kernels import native as native_lib
from kronjax._src.step import optim
from kronjax._src.train import runners
from reference import assert_same_tree, rel_err, run_pair

_MASK = lambda tree: {k: k != "a" for k in tree}  # noqa: E731

FORMS = [
    ("sgd momentum", lambda: optax.sgd(0.1, momentum=0.9), "trace"),
    ("inject_hyperparams", lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1,
                                                                      momentum=0.9), "trace"),
    ("schedule", lambda: optax.sgd(optax.linear_schedule(0.3, 0.1, 20), momentum=0.5), "trace"),
    ("chain trace scale", lambda: optax.chain(optax.scale(2.0), optax.trace(0.7),
                                              optax.scale(-0.1)), "trace"),
    ("momentum 0", lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1,
                                                               momentum=0.0), "trace"),
    ("decay then momentum", lambda: optax.chain(optax.add_decayed_weights(1e-3),
                                                optax.sgd(0.1, momentum=0.9)), "trace"),
    ("decay", lambda: optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1)), "decay"),
    ("plain sgd", lambda: optax.sgd(0.1), None),               # the shape-free path instead
    ("nesterov", lambda: optax.sgd(0.1, momentum=0.9, nesterov=True), None),
    ("two traces", lambda: optax.chain(optax.trace(0.9), optax.trace(0.5), optax.scale(-1.0)),
     None),
    ("decay after the trace", lambda: optax.chain(optax.trace(0.9), optax.add_decayed_weights(1e-3),
                                                  optax.scale(-0.1)), None),
    ("MultiSteps", lambda: optax.MultiSteps(optax.sgd(0.1, momentum=0.9), 2)
     .gradient_transformation(), None),
    ("masked", lambda: optax.chain(optax.masked(optax.trace(0.9), _MASK), optax.scale(-0.1)),
     None),
    ("masked decay", lambda: optax.chain(optax.add_decayed_weights(1e-3, mask=_MASK),
                                         optax.sgd(0.1)), None),
    ("assume_linear", lambda: kronjax.assume_linear(optax.sgd(0.1, momentum=0.9)), None),
]


@pytest.mark.parametrize("name,make,expected", FORMS, ids=[f[0] for f in FORMS])
def test_which_optimizers_are_applied_from_the_factors(name, make, expected):
  del name
  assert optim.update_form(make()) == expected


def _data(dims, n=40, n_eval=12, seed=0):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(seed), n + n_eval, dims,
                                      task="regression")
  train, held = data.subset(np.arange(n)), data.subset(np.arange(n, n + n_eval))
  return train, labels[:n], held, labels[n:]


def _decayed_sgd(learning_rate, weight_decay, momentum=None):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


TXS = {
    "momentum": lambda: optax.inject_hyperparams(optax.sgd)(
        learning_rate=optax.linear_schedule(0.6, 0.2, 30), momentum=0.8),
    "decay": lambda: optax.inject_hyperparams(_decayed_sgd)(learning_rate=0.5, weight_decay=0.05),
    "decay momentum": lambda: optax.inject_hyperparams(_decayed_sgd)(
        learning_rate=0.3, weight_decay=0.05, momentum=0.7),
}


@pytest.mark.parametrize("tx_name,form,update,layout,native,dims", [
    ("momentum", "trace", "full", "points", True, (4, 6)),
    ("momentum", "trace", "full", "neurons", True, (3, 2, 4)),
    ("momentum", "trace", "sparse", "neurons", True, (4, 6)),
    ("momentum", "trace", "full", "points", False, (3, 2, 4)),
    ("momentum", "trace", "sparse", "neurons", False, (4, 6)),
    ("decay", "decay", "full", "points", True, (3, 2, 4)),
    ("decay", "decay", "sparse", "neurons", False, (4, 6)),
    ("decay momentum", "trace", "full", "neurons", False, (4, 6)),
    ("decay momentum", "trace", "sparse", "neurons", True, (3, 2, 4)),
])
def test_matches_dense_sgd_with_eval_points(x64, tx_name, form, update, layout, native, dims):
  if native and not native_lib.available():
    pytest.skip(f"native kernel unavailable: {native_lib.info()['reason']}")
  with dispatch.using(native):
    train, y, held, y_held = _data(dims)
    config = kronjax.Config(width=64, threshold=0.4, train_output=True, output_bias=True)
    state, dstate, hist, dataset = run_pair(
        jax.random.PRNGKey(1), config, TXS[tx_name](), train, y,
        plan=kronjax.Plan(update=update, layout=layout), steps=30, batch=5, eval_data=held,
        eval_labels=y_held)
  assert state.tx.form == form and state.layout == layout
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  params = kronjax.dense_params(state, dataset)
  assert rel_err(params["W"], dstate.params["W"]) < 1e-9
  assert rel_err(params["a"], dstate.a) < 1e-9
  assert rel_err(state.P_eval, dstate.params["W"] @ held.materialize().T) < 1e-9
  np.testing.assert_allclose(np.asarray(state.bias), np.asarray(dstate.bias), atol=1e-12)
  if form == "trace":  # the trace of P is the trace of W times X^T (the dense optimizer's)
    trace_P = optim.tied_leaf_paths(state.opt_state, ("P",))["P"]
    trace_W = optim.tied_leaf_paths(dstate.opt_state, ("W",))["W"]
    leaf = lambda tree, path: dict(jax.tree_util.tree_flatten_with_path(tree)[0])[path]  # noqa: E731
    stored = leaf(state.opt_state, trace_P)
    stored = stored if layout == "neurons" else stored.T
    assert rel_err(stored, leaf(dstate.opt_state, trace_W) @ train.materialize().T) < 1e-9
  if "decay" in tx_name:
    assert float(state.w0_scale) < 1.0   # the init's weights decayed with the rest
  new = _data(dims, seed=5)[2]           # unseen points
  want = dense.forward(dstate.params["W"], dstate.a, dstate.b, new.materialize(), dstate.bias)
  assert rel_err(kronjax.predict(state, dataset, new), want) < 1e-9
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3


def test_a_skipped_step_keeps_every_trace():
  train, y, _, _ = _data((4, 6))
  dataset = kronjax.Dataset(train, y)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32, threshold=0.3), dataset,
                       optax.sgd(0.2, momentum=0.9))
  step = jax.jit(kronjax.train_step)
  state, _ = step(state, dataset, jnp.arange(4))     # nonzero traces
  bad = jnp.array([0, 1, 99], jnp.int32)             # out of range: skipped under jit
  after, metrics = jax.jit(lambda s, b: kronjax.train_step(s, dataset, b))(state, bad)
  assert bool(metrics["invalid_batch"]) and bool(metrics["skipped"])
  assert_same_tree(after, state)


@pytest.mark.parametrize("layout", ["neurons", "points"])
def test_a_momentum_sweep_has_no_full_size_temporaries(layout):
  """The vmapped step's temporaries stay below one member's P: no (S, m, n) gradient (the
  batch's columns and coefficients, (S, B, m) each, are what it holds)."""
  train, y, _, _ = _data((8, 8), n=256)
  dataset = kronjax.Dataset(train, y)
  members = sw.grid(learning_rate=[0.1, 0.2], momentum=[0.0, 0.9])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  states = sw.init(kronjax.Config(width=256, threshold=0.3), dataset, members, tx=tx,
                   plan=kronjax.Plan(update="full", layout=layout))
  assert states.tx.form == "trace"
  compiled = runners.sweep_step.lower(states, dataset, jnp.arange(8)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  member_P = states.P[0].size * states.P.dtype.itemsize
  assert temp < member_P, (temp, member_P)


def test_sweep_members_match_separate_runs(x64):
  """Momenta 0 and 0.9 side by side in one sweep: each member is its own run."""
  train, y, _, _ = _data((4, 6))
  dataset = kronjax.Dataset(train, y)
  members = sw.grid(learning_rate=[0.3], momentum=[0.0, 0.9], seed=[0])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  config = kronjax.Config(width=48, threshold=0.3)
  states = sw.init(config, dataset, members, tx=tx)
  plain = sw.init(config, dataset, [{"learning_rate": 0.3, "seed": 0}],
                  tx=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  assert states.tx.form == "trace" and plain.tx.shape_free
  singles = [sw.member(states, i) for i in range(2)]
  step = jax.jit(kronjax.train_step)
  for b in range(6):
    batch = jnp.arange(4 * b, 4 * b + 4)
    states, _ = sw.train_step(states, dataset, batch)
    plain, _ = sw.train_step(plain, dataset, batch)
    singles = [step(s, dataset, batch)[0] for s in singles]
  for i, single in enumerate(singles):
    assert rel_err(sw.member(states, i).P, single.P) < 1e-12
  assert rel_err(sw.member(states, 0).P, sw.member(plain, 0).P) < 1e-12  # momentum 0 is sgd
  assert rel_err(sw.member(states, 1).P, sw.member(plain, 0).P) > 1e-6
