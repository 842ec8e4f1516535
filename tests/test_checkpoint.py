"""kronjax.checkpoint: atomic save, exact restore, refusal of corrupt or mismatched checkpoints."""

import functools
import io
import json
import re
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


@functools.cache
def _dataset(seed=0, labels_shift=0.0, eval_start=0):
  """The training split (N points), its labels (+ ``labels_shift``) and 8 held-out eval points
  (from ``eval_start`` on)."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(seed), N + 16, DIMS, dtype=jnp.float32)
  held = jnp.arange(N + eval_start, N + eval_start + 8)
  return kronjax.Dataset(data.subset(jnp.arange(N)), labels[:N] + labels_shift,
                         eval_data=data.subset(held), eval_labels=labels[held])


def _init(key=None, *, config=None, tx=TX, **dataset):
  config = config or kronjax.Config(width=M, init="implicit")
  key = jax.random.PRNGKey(3) if key is None else key
  return kronjax.init(key, config, _dataset(**dataset), tx)


def _fit(state, key=1, **options):
  """``kronjax.fit`` on the default dataset, batch 4, no progress bar."""
  return kronjax.fit(state, _dataset(), jax.random.PRNGKey(key), batch_size=4, progress=False,
                     **options)


def _assert_same(x, y):
  lx, tx_ = jax.tree.flatten(x)
  ly, ty = jax.tree.flatten(y)
  assert tx_ == ty
  for a, b in zip(lx, ly):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


STATE_FIELDS = {".projections", ".A_T", ".a", ".b", ".opt_state", ".step", ".key", ".index",
                ".P_eval"}


def _manifest(path):
  with np.load(path) as npz:
    return json.loads(bytes(npz["__manifest__"]).decode())


def _rewrite_manifest(path, edit):
  """Rewrites the checkpoint at ``path`` with ``edit(manifest, arrays)`` applied."""
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  manifest = json.loads(bytes(arrays["__manifest__"]).decode())
  edit(manifest, arrays)
  arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path.write_bytes(buf.getvalue())


def test_roundtrip_is_exact_with_metadata(tmp_path):
  state = _init(jax.random.key(3))  # typed key leaf
  state, _ = _fit(state, steps=5)
  meta = {"fit_key": jax.random.key(7), "raw_key": jax.random.PRNGKey(2), "batch_size": 4,
          "history": {"loss": np.arange(5, dtype=np.float32), "replays": [(3, {"active_capacity": 16})]},
          "note": None}
  path = checkpoint.save(tmp_path, state, meta)
  assert path.name == "ckpt-0000000005.npz"
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
  restored, got = checkpoint.load(tmp_path, like=_init(jax.random.key(3)))
  _assert_same(restored, state)
  assert restored.config == state.config and restored.index_kind == state.index_kind
  assert restored.fingerprint == state.fingerprint == _dataset().fingerprint
  np.testing.assert_array_equal(jax.random.key_data(got["fit_key"]), jax.random.key_data(meta["fit_key"]))
  np.testing.assert_array_equal(got["raw_key"], meta["raw_key"])
  np.testing.assert_array_equal(got["history"]["loss"], meta["history"]["loss"])
  assert got["history"]["replays"] == [[3, {"active_capacity": 16}]]
  assert got["batch_size"] == 4 and got["note"] is None


def test_checkpoint_holds_the_state_only(tmp_path):
  """No data, labels or Gram in the file: its arrays are the state's leaves (and metadata)."""
  state = _init()
  path = checkpoint.save(tmp_path, state, {})
  manifest = _manifest(path)
  assert manifest["version"] == 2 and manifest["data_fingerprint"] == _dataset().fingerprint
  fields = {re.match(r"\.\w+", entry["path"]).group() for entry in manifest["leaves"]}
  assert fields <= STATE_FIELDS, fields
  assert len(manifest["leaves"]) == len(jax.tree.leaves(state))
  with np.load(path) as npz:
    shapes = {npz[k].shape for k in npz.files}
  assert (N, N) not in shapes and (N, 8) not in shapes        # neither Gram is stored


def test_point_major_momentum_state_roundtrips(tmp_path):
  config = kronjax.Config(width=M, init="implicit", update="full")   # P stored (n, m)
  tx = optax.sgd(0.5, momentum=0.9)
  state = _init(config=config, tx=tx)
  state, _ = _fit(state, steps=5)
  assert state.layout == "points" and state.projections.shape == (N, M)
  checkpoint.save(tmp_path, state, {})
  restored, _ = checkpoint.load(tmp_path, like=_init(config=config, tx=tx))
  _assert_same(restored, state)
  # Like capacities, the layout is not part of the network: a neuron-major `like` gets the
  # saved config back, and with it the saved layout (never a transposed misreading).
  other, _ = checkpoint.load(tmp_path, like=_init(config=config.replace(layout="neurons"), tx=tx))
  assert other.config == state.config and other.layout == "points"
  _assert_same(other, state)


@pytest.mark.parametrize("before_layout", [False, True])
def test_v1_checkpoint_is_refused_as_from_an_earlier_kronjax(tmp_path, before_layout):
  """Format v1 stored the dataset (data, labels, Gram) inside the state; v2 reads only v2.
  The same message for one written before Config.layout (no "layout", P stored as ".P")."""
  state, _ = _fit(_init(), steps=3)
  path = checkpoint.save(tmp_path, state, {})

  def as_v1(manifest, arrays):
    manifest["version"] = 1
    for name, array in (("data", _dataset().data.factors[0]), ("labels", _dataset().labels),
                        ("gram", _dataset().gram)):
      key = f"leaf_{len(manifest['leaves']):04d}"
      arrays[key] = np.asarray(array)
      manifest["leaves"].append({"path": f".{name}", "name": key, "dtype": arrays[key].dtype.name,
                                 "shape": list(arrays[key].shape), "prng_impl": None})
    if before_layout:
      del manifest["config"]["layout"]
      for entry in manifest["leaves"]:
        entry["path"] = ".P" if entry["path"] == ".projections" else entry["path"]

  _rewrite_manifest(path, as_v1)
  with pytest.raises(ValueError, match=r"written by an earlier kronjax \(format v1.*reads v2"):
    checkpoint.load(tmp_path, like=_init())


def test_restores_grown_capacity_config(tmp_path):
  like = _init()
  grown = kronjax.with_config(like, active_capacity=like.config.active_capacity + 8,
                              candidate_capacity=M)
  grown, _ = _fit(grown, steps=3)
  checkpoint.save(tmp_path, grown, {})
  restored, _ = checkpoint.load(tmp_path, like=like)
  assert restored.config == grown.config != like.config
  _assert_same(restored, grown)
  # It keeps training exactly like the original.
  a, _ = _fit(grown, steps=2)
  b, _ = _fit(restored, steps=2)
  _assert_same(a, b)


def test_keeps_latest_two_and_loads_a_given_step(tmp_path):
  state = _init()
  for _ in range(3):
    state, _ = _fit(state, steps=1)
    checkpoint.save(tmp_path, state, {"step": int(state.step)})
  assert checkpoint.steps(tmp_path) == [2, 3] and checkpoint.latest_step(tmp_path) == 3
  _, meta = checkpoint.load(tmp_path, like=_init(), step=2)
  assert meta["step"] == 2
  with pytest.raises(FileNotFoundError, match="step 1"):
    checkpoint.load(tmp_path, like=_init(), step=1)


def test_resuming_from_an_older_step_drops_the_abandoned_later_ones(tmp_path):
  state = _init()
  saved = {}
  for _ in range(3):
    state, _ = _fit(state, steps=1)
    checkpoint.save(tmp_path, state, keep=3)
    saved[int(state.step)] = state
  assert checkpoint.steps(tmp_path) == [1, 2, 3]
  # Roll back to step 1 and train on with another key: steps 2 and 3 are stale.
  state, _ = checkpoint.load(tmp_path, like=_init(), step=1)
  state, _ = _fit(state, key=7, steps=1)
  checkpoint.save(tmp_path, state, keep=3)
  assert checkpoint.steps(tmp_path) == [1, 2]
  restored, _ = checkpoint.load(tmp_path, like=_init())
  _assert_same(restored, state)
  assert not np.allclose(np.asarray(restored.P), np.asarray(saved[2].P))


def _assert_same_history(got, want, dtypes=True):
  timing = {"seconds", "steps_per_second", "resumed_from"}
  assert set(got) == set(want)
  for k in set(want) - timing:
    if isinstance(want[k], np.ndarray):
      assert got[k].dtype == want[k].dtype or not dtypes, (k, got[k].dtype, want[k].dtype)
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    else:
      assert got[k] == want[k], k


def _interrupted_and_resumed(directory, **options):
  """A run of 10 steps killed after its step-4 checkpoint (what it left is that checkpoint),
  started again as before with resume=True: it continues from step 4 to step 10."""
  _fit(_init(), **{**options, "steps": 6}, checkpoint_dir=directory, checkpoint_every=4)
  assert checkpoint.steps(directory) == [4, 6]
  checkpoint.checkpoint_path(directory, 6).unlink()
  return _fit(_init(), **options, checkpoint_dir=directory, checkpoint_every=4, resume=True)


def test_fit_checkpoints_resume_bit_for_bit(tmp_path):
  options = dict(steps=10, eval_every=2)
  full, h_full = _fit(_init(), **options)
  assert list(h_full["step"]) == list(range(1, 11)) and list(h_full["eval_step"]) == [2, 4, 6, 8, 10]
  resumed, h = _interrupted_and_resumed(tmp_path, **options)
  assert h["resumed_from"] == 4
  _assert_same(resumed, full)
  _assert_same_history(h, h_full)               # every step, the ones before the restart too
  assert checkpoint.steps(tmp_path) == [8, 10]
  # Resuming a run that has finished trains nothing and returns its state and history (the
  # history's float64 arrays come back float32: see the metadata test below).
  again, h_again = _fit(_init(), checkpoint_dir=tmp_path, resume=True, **options)
  assert h_again["resumed_from"] == 10
  _assert_same(again, full)
  _assert_same_history(h_again, h_full, dtypes=False)
  # Without a checkpoint, resume=True starts afresh (and equals the uninterrupted run).
  fresh, h_fresh = _fit(_init(), checkpoint_dir=tmp_path / "new", resume=True, **options)
  assert h_fresh["resumed_from"] == 0 and checkpoint.latest_step(tmp_path / "new") == 10
  _assert_same(fresh, full)
  _assert_same_history(h_fresh, h_full)


@pytest.mark.parametrize("every", ["eval_every", "log_every"])
def test_resumed_history_keeps_the_cadence_of_the_uninterrupted_run(tmp_path, every):
  options = {"steps": 10, every: 3}   # 3 does not divide the restart step 4
  full, h_full = _fit(_init(), **options)
  resumed, h = _interrupted_and_resumed(tmp_path, **options)
  _assert_same(resumed, full)
  _assert_same_history(h, h_full)


def test_float64_metadata_and_resumed_history_keep_their_dtype(tmp_path):
  meta = {"x": np.array([0.1, 1e-50]), "i": np.array([2**40])}
  checkpoint.save(tmp_path / "meta", _init(), meta)
  _, got = checkpoint.load(tmp_path / "meta", like=_init())
  for k, v in meta.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v)
  _, h_full = _fit(_init(), steps=4, eval_every=2)
  _fit(_init(), steps=4, eval_every=2, checkpoint_dir=tmp_path / "run")
  _, h_again = _fit(_init(), steps=4, eval_every=2, checkpoint_dir=tmp_path / "run", resume=True)
  _assert_same_history(h_again, h_full)


def test_checkpoint_resumes_by_hand_bit_for_bit(tmp_path):
  """The pieces resume uses: load the checkpoint and continue with its key and batch size."""
  full, _ = _fit(_init(), key=5, steps=10)
  _fit(_init(), key=5, steps=6, checkpoint_dir=tmp_path, checkpoint_every=4)
  restored, meta = checkpoint.load(tmp_path, like=_init(), step=4)
  assert meta["batch_size"] == 4 and list(meta["history"]["step"]) == [1, 2, 3, 4]
  resumed, _ = kronjax.fit(restored, _dataset(), meta["fit_key"], batch_size=4, steps=6,
                           progress=False)
  _assert_same(resumed, full)


def test_resume_refuses_another_key_or_batch_size(tmp_path):
  _fit(_init(), steps=4, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="another batch key or batch size"):
    _fit(_init(), key=2, steps=6, checkpoint_dir=tmp_path, resume=True)
  with pytest.raises(ValueError, match="another batch key or batch size"):
    kronjax.fit(_init(), _dataset(), jax.random.PRNGKey(1), batch_size=2, steps=6,
                progress=False, checkpoint_dir=tmp_path, resume=True)
  with pytest.raises(ValueError, match="past the 2 steps asked for"):
    _fit(_init(), steps=2, checkpoint_dir=tmp_path, resume=True)
  with pytest.raises(ValueError, match="without checkpoint_dir"):
    _fit(_init(), steps=2, resume=True)
  with pytest.raises(ValueError, match="without checkpoint_dir"):
    _fit(_init(), steps=2, checkpoint_every=1)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load(tmp_path / "nothing", like=_init())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_leaf", "bad_manifest"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
  path = checkpoint.save(tmp_path, _init(), {})
  raw = path.read_bytes()
  if damage == "truncate":   # a torn write
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
    (dict(tx=optax.sgd(2.0, momentum=0.9)), "optimizer"),
])
def test_mismatched_checkpoint_is_refused(tmp_path, other, match):
  checkpoint.save(tmp_path, _init(), {})
  with pytest.raises(ValueError, match=match):
    checkpoint.load(tmp_path, like=_init(**other))


@pytest.mark.parametrize("other", [dict(seed=1), dict(labels_shift=1.0), dict(eval_start=8)],
                         ids=["data", "labels", "eval_split"])
def test_like_built_from_another_dataset_is_refused(tmp_path, other):
  """Same shapes, other factors, labels or eval points: the fingerprint tells them apart."""
  checkpoint.save(tmp_path, _init(), {})
  like = _init(**other)
  assert like.fingerprint != _init().fingerprint
  with pytest.raises(ValueError, match=r"saved for another dataset.*Build `like` with "
                     r"kronjax.init from the same kronjax.Dataset"):
    checkpoint.load(tmp_path, like=like)


def test_bad_arguments(tmp_path):
  with pytest.raises(TypeError, match="state"):
    checkpoint.save(tmp_path, {"P": 1}, {})
  with pytest.raises(TypeError, match="metadata"):
    checkpoint.save(tmp_path, _init(), {"f": object()})
  with pytest.raises(ValueError, match="keep"):
    checkpoint.save(tmp_path, _init(), {}, keep=0)
  with pytest.raises(TypeError, match="like"):
    checkpoint.load(tmp_path, like=None)
