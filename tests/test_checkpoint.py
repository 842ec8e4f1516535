"""kronjax.checkpoint: atomic save, exact restore, refusal of corrupt or mismatched checkpoints."""

import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import checkpoint

N, M, DIMS = 24, 96, (4, 5)
TX = optax.sgd(2.0)


def _problem(seed=0, n=N):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(seed), n + 8, DIMS, dtype=jnp.float32)
  return (data.subset(jnp.arange(n)), labels[:n], data.subset(jnp.arange(n, n + 8)), labels[n:])


def _init(key=None, *, config=None, tx=TX, seed=0, n=N):
  train, y, held, y_held = _problem(seed, n)
  config = config or kronjax.Config(width=M, init="implicit")
  key = jax.random.PRNGKey(3) if key is None else key
  return kronjax.init(key, config, train, y, tx, eval_data=held, eval_labels=y_held)


def _assert_same(x, y):
  lx, tx_ = jax.tree.flatten(x)
  ly, ty = jax.tree.flatten(y)
  assert tx_ == ty
  for a, b in zip(lx, ly):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_roundtrip_is_exact_with_metadata(tmp_path):
  state = _init(jax.random.key(3))  # typed key leaf
  state, _ = kronjax.fit(state, jax.random.PRNGKey(1), batch_size=4, steps=5, progress=False)
  meta = {"fit_key": jax.random.key(7), "raw_key": jax.random.PRNGKey(2), "batch_size": 4,
          "history": {"loss": np.arange(5, dtype=np.float32), "replays": [(3, {"active_capacity": 16})]},
          "note": None}
  path = checkpoint.save(tmp_path, state, meta)
  assert path.name == "ckpt-0000000005.npz"
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
  restored, got = checkpoint.load(tmp_path, like=_init(jax.random.key(3)))
  _assert_same(restored, state)
  assert restored.config == state.config and restored.index_kind == state.index_kind
  np.testing.assert_array_equal(jax.random.key_data(got["fit_key"]), jax.random.key_data(meta["fit_key"]))
  np.testing.assert_array_equal(got["raw_key"], meta["raw_key"])
  np.testing.assert_array_equal(got["history"]["loss"], meta["history"]["loss"])
  assert got["history"]["replays"] == [[3, {"active_capacity": 16}]]
  assert got["batch_size"] == 4 and got["note"] is None


def test_point_major_momentum_state_roundtrips(tmp_path):
  config = kronjax.Config(width=M, init="implicit", update="dense")   # P stored (n, m)
  tx = optax.sgd(0.5, momentum=0.9)
  state = _init(config=config, tx=tx)
  state, _ = kronjax.fit(state, jax.random.PRNGKey(1), batch_size=4, steps=5, progress=False)
  assert state.layout == "points" and state.projections.shape == (N, M)
  checkpoint.save(tmp_path, state, {})
  restored, _ = checkpoint.load(tmp_path, like=_init(config=config, tx=tx))
  _assert_same(restored, state)
  # Like capacities, the layout is not part of the network: a neuron-major `like` gets the
  # saved config back, and with it the saved layout (never a transposed misreading).
  other, _ = checkpoint.load(tmp_path, like=_init(config=config.replace(layout="neurons"), tx=tx))
  assert other.config == state.config and other.layout == "points"
  _assert_same(other, state)


def test_checkpoint_from_before_the_layout_field_loads(tmp_path):
  """Written before Config.layout: no "layout" in the config, P stored as the leaf ".P"."""
  import io, json   # pylint: disable=g-import-not-at-top,multiple-imports
  state, _ = kronjax.fit(_init(), jax.random.PRNGKey(1), batch_size=4, steps=3, progress=False)
  path = checkpoint.save(tmp_path, state, {})
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  manifest = json.loads(bytes(arrays["__manifest__"]).decode())
  del manifest["config"]["layout"]
  for entry in manifest["leaves"]:
    entry["path"] = ".P" if entry["path"] == ".projections" else entry["path"]
  arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path.write_bytes(buf.getvalue())
  restored, _ = checkpoint.load(tmp_path, like=_init())
  # read as what old kronjax stored: neuron-major, said explicitly in the config
  assert restored.config == state.config.replace(layout="neurons")
  _assert_same(restored, state.replace(config=restored.config))


def test_restores_grown_capacity_config(tmp_path):
  like = _init()
  grown = kronjax.with_config(like, active_capacity=like.config.active_capacity + 8,
                              candidate_capacity=M)
  grown, _ = kronjax.fit(grown, jax.random.PRNGKey(1), batch_size=4, steps=3, progress=False)
  checkpoint.save(tmp_path, grown, {})
  restored, _ = checkpoint.load(tmp_path, like=like)
  assert restored.config == grown.config != like.config
  _assert_same(restored, grown)
  # It keeps training exactly like the original.
  a, _ = kronjax.fit(grown, jax.random.PRNGKey(1), batch_size=4, steps=2, progress=False)
  b, _ = kronjax.fit(restored, jax.random.PRNGKey(1), batch_size=4, steps=2, progress=False)
  _assert_same(a, b)


def test_keeps_latest_two_and_loads_a_given_step(tmp_path):
  state = _init()
  for _ in range(3):
    state, _ = kronjax.fit(state, jax.random.PRNGKey(1), batch_size=4, steps=1, progress=False)
    checkpoint.save(tmp_path, state, {"step": int(state.step)})
  assert checkpoint.steps(tmp_path) == [2, 3]
  _, meta = checkpoint.load(tmp_path, like=_init(), step=2)
  assert meta["step"] == 2
  with pytest.raises(FileNotFoundError, match="step 1"):
    checkpoint.load(tmp_path, like=_init(), step=1)


def test_resuming_from_an_older_step_drops_the_abandoned_later_ones(tmp_path):
  state = _init()
  saved = {}
  for _ in range(3):
    state, _ = kronjax.fit(state, jax.random.PRNGKey(1), batch_size=4, steps=1, progress=False)
    checkpoint.save(tmp_path, state, keep=3)
    saved[int(state.step)] = state
  assert checkpoint.steps(tmp_path) == [1, 2, 3]
  # Roll back to step 1 and train on with another key: steps 2 and 3 are stale.
  state, _ = checkpoint.load(tmp_path, like=_init(), step=1)
  state, _ = kronjax.fit(state, jax.random.PRNGKey(7), batch_size=4, steps=1, progress=False)
  checkpoint.save(tmp_path, state, keep=3)
  assert checkpoint.steps(tmp_path) == [1, 2]
  restored, _ = checkpoint.load(tmp_path, like=_init())
  _assert_same(restored, state)
  assert not np.allclose(np.asarray(restored.P), np.asarray(saved[2].P))


def test_fit_checkpoints_resume_bit_for_bit(tmp_path):
  key = jax.random.PRNGKey(5)
  full, _ = kronjax.fit(_init(), key, batch_size=4, steps=10, progress=False)
  kronjax.fit(_init(), key, batch_size=4, steps=6, progress=False,
              checkpoint_dir=tmp_path, checkpoint_every=4)
  assert checkpoint.steps(tmp_path) == [4, 6]
  # "killed" after step 4: resume from that checkpoint
  restored, meta = checkpoint.load(tmp_path, like=_init(), step=4)
  assert meta["batch_size"] == 4
  resumed, _ = kronjax.fit(restored, meta["fit_key"], batch_size=4, steps=6, progress=False)
  _assert_same(resumed, full)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load(tmp_path / "nothing", like=_init())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_leaf", "bad_manifest"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
  path = checkpoint.save(tmp_path, _init(), {})
  raw = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(raw[: len(raw) // 2])
  elif damage == "garbage":
    path.write_bytes(b"not a zip file at all" * 10)
  else:
    with zipfile.ZipFile(path) as zin:
      entries = {name: zin.read(name) for name in zin.namelist()}
    if damage == "drop_leaf":
      del entries["leaf_0000.npy"]
    else:
      entries["__manifest__.npy"] = entries["__manifest__.npy"][:-40]
    with zipfile.ZipFile(path, "w") as zout:
      for name, blob in entries.items():
        zout.writestr(name, blob)
  with pytest.raises(ValueError, match="corrupt"):
    checkpoint.load(tmp_path, like=_init())


@pytest.mark.parametrize("other, match", [
    (dict(config=kronjax.Config(width=M + 8, init="implicit")), "config.width"),
    (dict(config=kronjax.Config(width=M, init="explicit")), "config.init"),
    (dict(seed=1), "different data"),
    (dict(tx=optax.sgd(2.0, momentum=0.9)), "optimizer"),
])
def test_mismatched_checkpoint_is_refused(tmp_path, other, match):
  checkpoint.save(tmp_path, _init(), {})
  with pytest.raises(ValueError, match=match):
    checkpoint.load(tmp_path, like=_init(**other))


def test_bad_arguments(tmp_path):
  with pytest.raises(TypeError, match="state"):
    checkpoint.save(tmp_path, {"P": 1}, {})
  with pytest.raises(TypeError, match="metadata"):
    checkpoint.save(tmp_path, _init(), {"f": object()})
  with pytest.raises(TypeError, match="like"):
    checkpoint.load(tmp_path, like=None)
