"""Which optimizers kronjax runs, decided by their structure (``kronjax._src.step.optim``).

Every optimizer kronjax accepts trains exactly the dense network (float64 against the dense
baseline on the materialized inputs, same key, same batches); every other one is refused
with a message naming the offending part, however it is wrapped (a warmup that hides Adam's
first steps, ``optax.MultiSteps``, ``optax.inject_hyperparams``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import dense
from kronjax._src.step import optim


def _task(n=40, dims=(3, 4), dtype=jnp.float32, eval_points=0):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), n + eval_points, dims,
                                      task="regression", dtype=dtype)
  if not eval_points:
    return kronjax.Dataset(data, labels)
  return kronjax.Dataset(data.subset(jnp.arange(n)), labels[:n],
                         eval_data=data.subset(jnp.arange(n, n + eval_points)),
                         eval_labels=labels[n:])


@pytest.fixture(scope="module")
def dataset():
  return _task(eval_points=5)   # with eval points: P_eval is one of the optimizer's leaves


def _init(dataset, tx, **config):
  return kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, **config), dataset, tx)


WARMUP = optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(1e-2)], [4])


def _by_key(names):
  return lambda p: {k: "out" if k in names else "hidden" for k in p}


# --- refused, naming the part ---------------------------------------------------------

@pytest.mark.parametrize("tx, part", [
    # A probe of three steps saw zero updates behind these: accepted, trained neither.
    (optax.adam(WARMUP), r"optax.scale_by_adam inside optax.chain"),
    (optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4).gradient_transformation(),
     r"optax.scale_by_adam inside optax.chain inside optax.MultiSteps"),
    # Clips the norm of {A, P}, not of W.
    (optax.MultiSteps(optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(0.1)),
                      4).gradient_transformation(),
     r"optax.clip_by_global_norm inside optax.chain inside optax.MultiSteps .*not of W"),
    (optax.inject_hyperparams(optax.adam)(learning_rate=WARMUP),
     r"optax.scale_by_adam inside optax.chain inside optax.inject_hyperparams\(optax.adam\)"),
    # Skips steps by a test on the values of A's and P's gradients.
    (optax.MultiSteps(optax.sgd(0.1), 4,
                      should_skip_update_fn=optax.skip_not_finite).gradient_transformation(),
     r"optax.MultiSteps with should_skip_update_fn=.*skip_not_finite"),
], ids=["adam_warmup", "multisteps_adam", "multisteps_clip", "inject_adam", "multisteps_skip"])
def test_silently_wrong_optimizers_are_refused_naming_the_part(dataset, tx, part):
  with pytest.raises(ValueError, match=r"tx cannot be used by kronjax: " + part):
    _init(dataset, tx)


@pytest.mark.parametrize("tx, part", [
    (optax.adam(1e-3), "optax.scale_by_adam inside optax.chain is not linear"),
    (optax.adamw(1e-3), "optax.scale_by_adam inside optax.chain is not linear"),
    (optax.chain(optax.clip(1.0), optax.sgd(0.1)), "optax.clip inside optax.chain is not linear"),
    (optax.chain(optax.clip_by_global_norm(1e5), optax.sgd(0.1)),
     "optax.clip_by_global_norm inside optax.chain is not linear"),
    (optax.chain(optax.scale_by_rms(), optax.scale(-0.1)),
     "optax.scale_by_rms inside optax.chain is not linear"),
    (optax.sgd(jnp.ones(3)), r"optax.scale inside optax.chain is not a scalar map: its step size "
     r"has shape \(3,\)"),
    (optax.chain(optax.ema(0.9), optax.sgd(0.1)), "optax.ema inside optax.chain is not one of"),
], ids=["adam", "adamw", "clip", "clip_by_global_norm", "scale_by_rms", "vector_lr", "ema"])
def test_nonlinear_optimizers_are_refused_with_what_works(dataset, tx, part):
  with pytest.raises(ValueError) as info:
    _init(dataset, tx, train_output=True)
  message = str(info.value)
  assert re.search(part, message), message
  assert "span(W0, X)" in message and "Use one of: optax.sgd" in message
  assert "kronjax.assume_linear" in message


@pytest.mark.parametrize("tx, part", [
    (optax.chain(optax.sgd(0.5),
                 optax.masked(optax.scale(3.0), lambda p: {k: k == "A" for k in p})),
     r"optax.masked inside optax.chain updates 'P' differently from 'A'"),
    (optax.multi_transform({"hidden": optax.sgd(0.1), "out": optax.sgd(0.2)}, _by_key(("P_eval",))),
     r"optax.multi_transform updates 'P_eval' differently from 'A' \(its labels: 'hidden' for "
     r"'A', 'out' for 'P_eval'\)"),
    # Decaying the matrices only would leave the W0 scale (a scalar) undecayed.
    (optax.chain(optax.add_decayed_weights(
        0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)), optax.sgd(0.1)),
     r"optax.masked inside optax.chain updates 'W0' differently from 'A'"),
], ids=["masked_A", "multi_transform_P_eval", "decay_mask_by_rank"])
def test_masks_that_separate_A_P_P_eval_and_W0_are_refused(dataset, tx, part):
  with pytest.raises(ValueError, match=part):
    _init(dataset, tx)


def _failing_factory(learning_rate):
  raise RuntimeError("no inner transformation")


def _update_of_another_optax():
  def update_fn(updates, state, params=None):
    return updates, state
  update_fn.__module__, update_fn.__qualname__ = "optax.future", "chain.<locals>.update_fn"
  return optax.GradientTransformation(lambda params: (), update_fn)


@pytest.mark.parametrize("tx, match", [
    (optax.multi_transform({"x": optax.sgd(0.1)}, {"A": "x"}),
     r"optax.multi_transform fails: its labels cannot be read on the trainable tree "
     r"\['A', 'P', 'P_eval'\] \(KeyError: 'P'\)\.$"),
    (optax.masked(optax.sgd(0.1), lambda p: {k: jnp.ones(2, bool) if k == "A" else True
                                             for k in p}),
     r"optax.masked gives 'A' a mask entry of shape \(2,\); optax and kronjax need one per leaf"),
    (optax.sgd(lambda count: 0.1 * jnp.ones(3)),
     r"optax.scale_by_schedule inside optax.chain is not a scalar map: its step size has shape "
     r"\(3,\)"),
    (optax.sgd(lambda count: count.no_such_attribute),
     r"optax.scale_by_schedule inside optax.chain has a step size schedule that cannot be "
     r"evaluated at step 0 \(AttributeError"),
    (optax.chain(optax.trace(jnp.full(2, 0.9)), optax.scale(-0.1)),
     r"optax.trace inside optax.chain is not a scalar map: its decay has shape \(2,\)"),
    (optax.inject_hyperparams(_failing_factory)(learning_rate=0.1),
     r"optax.inject_hyperparams\(.*_failing_factory\) cannot build its inner transformation "
     r"\(RuntimeError: no inner transformation\)"),
    (_update_of_another_optax(),
     r"optax.chain could not be read by kronjax \(KeyError: 'update_fns'\); this version of "
     r"optax may lay it out differently"),
], ids=["labels", "mask_entry", "vector_schedule", "failing_schedule", "vector_decay",
        "failing_factory", "other_layout"])
def test_parts_that_cannot_be_read_are_refused_saying_why(dataset, tx, match):
  with pytest.raises(ValueError, match=match):
    _init(dataset, tx)


def test_a_transformation_of_ones_own_is_refused_pointing_to_assume_linear(dataset):
  half = optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda u, state, params=None: (
                                          jax.tree.map(lambda g: 0.5 * g, u), state))
  with pytest.raises(ValueError, match=r"the transformation of your own .*<lambda> inside "
                     r"optax.chain is not an optax building block kronjax knows \(if it is "
                     r"linear with one scalar per step, wrap it in kronjax.assume_linear\)"):
    _init(dataset, optax.chain(half, optax.sgd(0.1)))


def test_traced_learning_rate_is_refused_with_the_alternative(dataset):
  config = kronjax.Config(width=16)
  with pytest.raises(ValueError, match=r"optax.scale inside optax.chain holds a traced step size"
                     r".*optax.inject_hyperparams\(optax.sgd\)\(learning_rate=...\)"):
    jax.vmap(lambda lr: kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(lr)))(
        jnp.array([0.1, 0.2]))
  # The alternative: the learning rate lives in the optimizer state, traced or not.
  states = jax.vmap(lambda lr: kronjax.init(jax.random.PRNGKey(0), config, dataset,
                                            optax.inject_hyperparams(optax.sgd)(learning_rate=lr)))(
                                                jnp.array([0.1, 0.2]))
  np.testing.assert_allclose(states.opt_state.hyperparams["learning_rate"], [0.1, 0.2])


# --- accepted ---------------------------------------------------------------------------

def _decayed_sgd(learning_rate, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


ACCEPTED = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "schedule": lambda: optax.sgd(optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, 50)),
    "warmup_join": lambda: optax.sgd(WARMUP, momentum=0.5),
    "inject_sgd": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
    "inject_schedule": lambda: optax.inject_hyperparams(optax.sgd)(
        learning_rate=optax.linear_schedule(0.1, 0.0, 20)),
    "inject_decayed": lambda: optax.inject_hyperparams(_decayed_sgd)(learning_rate=0.1,
                                                                      weight_decay=1e-3),
    "decay": lambda: optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1)),
    "decay_momentum": lambda: optax.chain(optax.add_decayed_weights(1e-3),
                                          optax.sgd(0.1, momentum=0.8)),
    "decay_schedule": lambda: optax.chain(optax.add_decayed_weights(optax.linear_schedule(
        1e-3, 0.0, 10)), optax.sgd(0.1)),
    "trace_scale": lambda: optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(0.1)),
    "scale_by_schedule": lambda: optax.chain(optax.scale_by_schedule(WARMUP), optax.scale(-1.0)),
    "identity": lambda: optax.chain(optax.identity(), optax.sgd(0.1)),
    "named_chain": lambda: optax.named_chain(("momentum", optax.trace(0.9)),
                                             ("lr", optax.scale(-0.1))),
    "multisteps_sgd": lambda: optax.MultiSteps(optax.sgd(0.1, momentum=0.5),
                                               every_k_schedule=3).gradient_transformation(),
    "mask_output_layer": lambda: optax.chain(
        optax.sgd(0.5), optax.masked(optax.scale(3.0), lambda p: {k: k == "a" for k in p})),
    "mask_all_tied": lambda: optax.chain(
        optax.sgd(0.5), optax.masked(optax.scale(3.0), lambda p: {k: k != "a" for k in p})),
    "multi_transform_adam_output": lambda: optax.multi_transform(
        {"hidden": optax.sgd(0.1, momentum=0.9), "out": optax.adam(1e-2)}, _by_key(("a", "bias"))),
    "decay_mask_keeps_tied": lambda: optax.chain(
        optax.add_decayed_weights(1e-3, mask=lambda p: {k: k in ("A", "P", "P_eval", "W0")
                                                        for k in p}), optax.sgd(0.1)),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_linear_optimizers_are_accepted(dataset, name):
  state = _init(dataset, ACCEPTED[name](), train_output=True, output_bias=True)
  assert state.tx.needs_params == ("decay" in name)


def test_known_blocks_are_accepted_without_a_probe(monkeypatch):
  def no_probe(*args, **kwargs):
    raise AssertionError("probed")
  monkeypatch.setattr(optim, "_probe", no_probe)
  for make in ACCEPTED.values():
    optim.check_linear(make(), keys=("A", "P", "a", "bias", "P_eval"))


# --- exact against dense ----------------------------------------------------------------

def _batches(n, batch, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.choice(n, batch, replace=False).astype(np.int32) for _ in range(steps)]


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def _against_dense(make_tx, config, plan=None, steps=9, batch=6):
  """kronjax and the dense baseline, float64, same key and batches: (state, dense state)."""
  ds = _task(dtype=jnp.float64)
  key = jax.random.PRNGKey(3)
  state = kronjax.init(key, config, ds, make_tx(), plan=plan)
  X = ds.data.materialize()
  dstate = dense.init(key, config, ds.data.dims, make_tx(), dtype=X.dtype)
  dstep = dense.make_step(config, make_tx(), donate=False)
  step = jax.jit(kronjax.train_step)
  for idx in _batches(ds.n, batch, steps):
    state, metrics = step(state, ds, jnp.asarray(idx))
    assert not bool(metrics["skipped"])
    dstate, _ = dstep(dstate, X[idx], ds.labels[idx])
  params = kronjax.dense_params(state, ds)
  assert _rel(params["W"], dstate.params["W"]) < 1e-9
  assert _rel(state.P, dstate.params["W"] @ X.T) < 1e-9
  if config.train_output:
    assert _rel(params["a"], dstate.a) < 1e-9
  return state, dstate


class _Half(optax.GradientTransformation):
  """A transformation of one's own: halves the updates (linear, one scalar)."""

  def __new__(cls):
    return super().__new__(cls, lambda params: optax.EmptyState(),
                           lambda updates, state, params=None: (
                               jax.tree.map(lambda g: 0.5 * g, updates), state))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name, make_tx, plan", [
    ("multisteps_momentum", ACCEPTED["multisteps_sgd"], None),
    ("multisteps_decay", lambda: optax.MultiSteps(
        optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.4)), 2).gradient_transformation(),
     kronjax.Plan(update="sparse")),
    ("adam_on_the_output_layer", lambda: optax.multi_transform(
        {"hidden": optax.sgd(0.4, momentum=0.5), "out": optax.adam(1e-2)}, _by_key(("a", "bias"))),
     kronjax.Plan(update="sparse")),
    ("assume_linear", lambda: optax.chain(kronjax.assume_linear(_Half()),
                                          optax.sgd(0.8, momentum=0.5)), None),
    ("assume_linear_shape_free", lambda: optax.chain(kronjax.assume_linear(_Half()),
                                                     optax.sgd(0.8)), kronjax.Plan(update="full")),
])
def test_accepted_compositions_train_the_dense_network_exactly(name, make_tx, plan):
  config = kronjax.Config(width=32, threshold=0.3, train_output=True, output_bias=True)
  state, dstate = _against_dense(make_tx, config, plan)
  if name.startswith("multisteps"):
    assert int(state.opt_state.gradient_step) == 9 // (3 if "momentum" in name else 2)
  if name == "assume_linear_shape_free":
    assert state.tx.shape_free


@pytest.mark.usefixtures("x64")
def test_a_mask_that_reads_shapes_keeps_the_step_exact():
  """The shape-free path hands the optimizer A and P as scalars, where a mask by rank would
  read them differently: such a transformation is not shape-free, and trains exactly."""
  def make_tx():
    return optax.chain(optax.sgd(0.4), optax.masked(
        optax.scale(2.0), lambda p: jax.tree.map(lambda x: x.ndim == 2, p)))
  config = kronjax.Config(width=32, threshold=0.3, train_output=True)
  state, _ = _against_dense(make_tx, config)
  assert not state.tx.shape_free
  assert optim.is_shape_free(optax.sgd(0.4), state.trainable())


# --- assume_linear ----------------------------------------------------------------------

@pytest.mark.parametrize("tx, match", [
    (optax.adam(1e-3), r"kronjax.assume_linear\(optax.chain\) is asserted linear, but a probe "
     r"finds that its update is not linear"),
    (optax.stateless(lambda u, params=None: jax.tree.map(lambda g: jnp.flip(g, -1), u)),
     r"asserted linear, but a probe finds that its update of 'A' is not a scalar multiple"),
], ids=["adam", "permutation"])
def test_assume_linear_still_catches_gross_mistakes(dataset, tx, match):
  with pytest.raises(ValueError, match=match):
    _init(dataset, optax.chain(kronjax.assume_linear(tx), optax.sgd(0.1)))


def test_assume_linear_takes_a_transformation():
  with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation"):
    kronjax.assume_linear(lambda g: g)

  class Halve:  # init and update suffice
    def init(self, params):
      return ()

    def update(self, updates, state, params=None):
      return jax.tree.map(lambda g: 0.5 * g, updates), state

  tx = kronjax.assume_linear(Halve())
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  optim.check_linear(optax.chain(tx, optax.sgd(0.1)), keys=("A", "P"))
