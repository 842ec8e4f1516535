"""kronjax.verify and fit(..., verify_every=...); the Network pytree; fit refuses sweep states."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.inference import verify as verify_lib

N, DIMS = 48, (5, 6)


def _trained(init="kronecker", steps=50, gram="precomputed", dtype=jnp.float32, eval_split=False):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), N + 8, DIMS, task="regression",
                                      dtype=dtype)
  split = {}
  if eval_split:
    split = dict(eval_data=data.subset(jnp.arange(N, N + 8)), eval_labels=labels[N:])
  dataset = kronjax.Dataset(data.subset(jnp.arange(N)), labels[:N], gram=gram, **split)
  state = kronjax.init(jax.random.PRNGKey(1), kronjax.Config(width=128, init=init), dataset,
                       optax.sgd(2.0))
  if steps:
    state, _ = kronjax.fit(state, dataset, jax.random.PRNGKey(2), batch_size=6, steps=steps,
                           progress=False)
  return state, dataset


@pytest.mark.parametrize("init,gram,eval_split", [("kronecker", "precomputed", False),
                                                  ("explicit", "factors", False),
                                                  ("implicit", "precomputed", True)])
def test_float32_state_verifies_and_a_corrupted_one_does_not(init, gram, eval_split):
  state, dataset = _trained(init, gram=gram, eval_split=eval_split)
  assert int(state.step) == 50
  report = kronjax.verify(state, dataset)
  assert report["points_checked"] == N   # sample=256 >= n: every point
  assert report["relative_error"] < 1e-4 and report["max_abs_error"] < 1e-4, report
  bad = state.replace(P=state.P.at[0, 0].add(1.0))
  report = kronjax.verify(bad, dataset, sample=N)
  assert report["max_abs_error"] == pytest.approx(1.0, rel=1e-3)
  assert report["relative_error"] > 1e-2, report
  # A sample: points_checked says how many; a key picks them.
  part = kronjax.verify(state, dataset, sample=7, key=jax.random.PRNGKey(4))
  assert part["points_checked"] == 7 and part["relative_error"] < 1e-4


def test_verify_checks_the_sampled_columns():
  state, dataset = _trained(steps=10)
  cols = verify_lib.sample_columns(N, 5, jax.random.PRNGKey(4), 0)
  assert len(set(np.asarray(cols).tolist())) == 5
  inside = int(cols[0])
  outside = next(j for j in range(N) if j not in np.asarray(cols).tolist())
  for j, caught in ((inside, True), (outside, False)):
    bad = state.replace(P=state.P.at[3, j].add(1.0))
    rel = kronjax.verify(bad, dataset, sample=5, key=jax.random.PRNGKey(4))["relative_error"]
    assert (rel > 1e-2) == caught, (j, rel)


def test_float64_state_verifies_to_rounding(x64):
  state, dataset = _trained(dtype=jnp.float64)
  assert state.P.dtype == jnp.float64
  report = kronjax.verify(state, dataset)
  assert report["relative_error"] < 1e-11, report


def test_fit_verify_every_raises_naming_the_step():
  state, dataset = _trained(steps=0)
  fit = lambda s, **kw: kronjax.fit(s, dataset, jax.random.PRNGKey(2), batch_size=6,  # noqa: E731
                                    progress=False, **kw)
  healthy, _ = fit(state, steps=12, verify_every=4)
  assert int(healthy.step) == 12
  bad = state.replace(P=state.P.at[0, 0].add(1.0))
  with pytest.raises(FloatingPointError, match=r"step 4: the maintained projections P .*"
                                               r"relative error .* > 0\.001"):
    fit(bad, steps=12, verify_every=4)
  with pytest.raises(ValueError, match="verify_every must be >= 0"):
    fit(state, steps=1, verify_every=-1)


def test_sweep_fit_verifies_every_member():
  _, dataset = _trained(steps=0)
  states = kronjax.sweep.init(kronjax.Config(width=128), dataset,
                              kronjax.sweep.grid(learning_rate=[1.0, 2.0]))
  fit = lambda s: kronjax.sweep.fit(s, dataset, jax.random.PRNGKey(2),  # noqa: E731
                                    batch_size=6, steps=4, progress=False, verify_every=2)
  fit(states)
  bad = states.replace(P=states.P.at[1, 0, 0].add(1.0))
  with pytest.raises(FloatingPointError, match=r"step 2: .*sweep member\(s\) \[1\]"):
    fit(bad)


def test_verify_and_fit_refuse_bad_arguments_and_sweep_states():
  state, dataset = _trained(steps=0)
  with pytest.raises(ValueError, match="sample must be >= 1"):
    kronjax.verify(state, dataset, sample=0)
  with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
    kronjax.verify(state, dataset, key=3)
  states = kronjax.sweep.init(kronjax.Config(width=128), dataset,
                              kronjax.sweep.grid(learning_rate=[1.0, 2.0]))
  message = r"this is a sweep state: use kronjax.sweep.member\(state, i\) or jax.vmap"
  with pytest.raises(TypeError, match=message):
    kronjax.verify(states, dataset)
  with pytest.raises(TypeError, match=message):
    kronjax.fit(states, dataset, jax.random.PRNGKey(0), batch_size=6, steps=1, progress=False)
  with pytest.raises(TypeError, match=message):
    kronjax.network.from_state(states, dataset)


def test_network_is_a_pytree_that_passes_through_jit():
  state, dataset = _trained(steps=10)
  network = kronjax.network.from_state(state, dataset)
  leaves, treedef = jax.tree.flatten(network)
  assert any(x is network.A for x in leaves)
  assert all(isinstance(x, jax.Array) for x in leaves)   # config is static, not a leaf
  again = jax.tree.unflatten(treedef, leaves)
  assert again.config == network.config
  new = kronjax.data.synthetic(jax.random.PRNGKey(7), 9, DIMS, rank=2)
  expected = kronjax.predict(state, dataset, new)
  predict = jax.jit(lambda net, data: net.predict(data))
  np.testing.assert_allclose(predict(network, new), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(network.predict(new), expected, rtol=1e-6, atol=1e-6)
  # Another network of the same shapes reuses the compiled function.
  trained_more = kronjax.network.from_state(_trained(steps=12)[0], dataset)
  predict(trained_more, new)
  assert predict._cache_size() == 1
  assert isinstance(jax.tree.map(lambda x: x, network), kronjax.network.Network)


def test_verify_pairs_of_entities():
  rng = np.random.default_rng(0)
  tables = tuple(rng.standard_normal((N_q, d)).astype(np.float32)
                 for N_q, d in zip((9, 6), (3, 5)))
  index = np.stack([rng.integers(0, N_q, 40) for N_q in (9, 6)], axis=1)
  data = kronjax.KronData(tables, index=index).normalize()
  dataset = kronjax.Dataset(data, jnp.asarray(rng.standard_normal(40), jnp.float32))
  assert dataset.gram_mode == "entities"
  state = kronjax.init(jax.random.PRNGKey(1), kronjax.Config(width=64), dataset, optax.sgd(1.0))
  state, _ = kronjax.fit(state, dataset, jax.random.PRNGKey(2), batch_size=5, steps=20,
                         progress=False, verify_every=10)
  assert kronjax.verify(state, dataset, sample=16)["relative_error"] < 1e-4
  bad = state.replace(P=state.P.at[5, 0].add(1.0))
  assert kronjax.verify(bad, dataset)["relative_error"] > 1e-2
