"""A negative threshold b: relu(z - b) with most neurons active, exact against dense SGD (float64).

b < 0 moves the network's kernel from the arc-cosine kernel (b = 0) toward the linear kernel
(b -> -inf). Every neuron may fire, so the active capacity is the width and ``update="auto"``
takes the full path; the sparse path and the threshold index must still be exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import dense
from kronjax._src.step import plan as plan_lib
from reference import rel_err as _rel, run_pair

pytestmark = pytest.mark.usefixtures("x64_module")

B = -0.7
TXS = {"sgd": lambda: optax.sgd(0.3), "momentum": lambda: optax.sgd(0.2, momentum=0.8)}


def _task(dims, n=60, n_new=7, seed=0):
  key = jax.random.PRNGKey(seed)
  data, labels = kronjax.data.planted(key, n + n_new, dims=dims, task="regression",
                                      dtype=jnp.float64)
  return data.subset(jnp.arange(n)), labels[:n], data.subset(jnp.arange(n, n + n_new))


def _run(config, tx_name, dims, plan=None):
  """kronjax and dense SGD from one key on the same batches (``reference.run_pair``)."""
  data, labels, new = _task(dims)
  state, dstate, hist, dataset = run_pair(jax.random.PRNGKey(3), config, TXS[tx_name](), data,
                                          labels, plan=plan, steps=25, batch=6)
  assert hist["kron"]["active"] == hist["dense"]["active"]
  # Most neurons fire at b < 0 (Q(-0.7) = 0.76 at init): the regime under test.
  assert np.mean(hist["kron"]["active"]) > 0.6 * config.width
  return state, dstate, dataset, new


CASES = [
    # (tx, centered, train_output, dims, plan): auto takes the full path at b < 0.
    ("sgd", True, False, (4, 6), None),
    ("momentum", True, True, (3, 2, 4), kronjax.Plan(update="sparse")),
    ("sgd", True, True, (3, 2, 4), kronjax.Plan(update="sparse", index="bucketed")),
    ("momentum", False, False, (4, 6), kronjax.Plan(update="full")),
]


@pytest.mark.parametrize("tx_name,centered,train_output,dims,plan", CASES)
def test_matches_dense_sgd_and_predicts_unseen_points(tx_name, centered, train_output, dims,
                                                      plan):
  config = kronjax.Config(width=48, threshold=B, centered=centered, train_output=train_output)
  state, dstate, dataset, new = _run(config, tx_name, dims, plan)
  params = kronjax.dense_params(state, dataset)
  assert _rel(params["W"], dstate.params["W"]) < 1e-9
  assert _rel(state.P, dstate.params["W"] @ dataset.data.materialize().T) < 1e-9
  if train_output:
    assert _rel(params["a"], dstate.a) < 1e-12
  want = dense.forward(dstate.params["W"], dstate.a, dstate.b, new.materialize(), dstate.bias)
  assert _rel(kronjax.predict(state, dataset, new), want) < 1e-9


def test_capacity_is_the_width_and_auto_takes_the_full_path():
  for m in (16, 512):
    assert plan_lib.default_active_capacity(m, -1.0) == m
  config = kronjax.Config(width=512, threshold=-0.5)
  assert kronjax.Plan().resolve(config).active_capacity == 512
  assert kronjax.Plan().update_path(config, 1) == "full"
  assert config.firing_probability > 0.5


def test_a_sweep_member_with_a_negative_b_is_its_single_run():
  # The sweep's capacity comes from config's default b, so b < 0 members overflow it and
  # are replayed at a grown capacity: the result must still be the single run's.
  data, labels, _ = _task((4, 6))
  dataset = kronjax.Dataset(data, labels)
  members = kronjax.sweep.grid(threshold=[-1.0, 0.5], learning_rate=[0.2])
  config = kronjax.Config(width=32, centered=True)
  states = kronjax.sweep.init(config, dataset, members)
  states, _ = kronjax.sweep.fit(states, dataset, jax.random.PRNGKey(1), batch_size=5, steps=6,
                                progress=False)
  for i, member in enumerate(members):
    one = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(member["learning_rate"]),
                       threshold=member["threshold"])
    one, _ = kronjax.fit(one, dataset, jax.random.PRNGKey(1), batch_size=5, steps=6,
                         progress=False)
    got = kronjax.sweep.member(states, i)
    assert float(got.b) == member["threshold"]
    assert _rel(got.P, one.P) < 1e-10


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_thresholds_are_refused(bad):
  with pytest.raises(ValueError, match=r"threshold must be a finite number.*got"):
    kronjax.Config(width=16, threshold=bad)
  data, labels, _ = _task((4, 6))
  with pytest.raises(ValueError, match=r"threshold must be a finite number.*got"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels),
                 optax.sgd(0.1), threshold=bad)
