"""kronjax.checkpoint: atomic save, exact restore, refusal of corrupt or mismatched checkpoints.

The multi-process and multi-device cases are in tests/test_multiprocess.py and
tests/test_sharding.py.
"""

import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from reference import assert_same_tree
from kronjax import checkpoint
from kronjax._src.data.dataset import fingerprint_text

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


def _init(key=None, *, config=None, tx=TX, plan=None, **dataset):
  config = config or kronjax.Config(width=M, init="implicit")
  key = jax.random.PRNGKey(3) if key is None else key
  return kronjax.init(key, config, _dataset(**dataset), tx, plan=plan)


def _fit(state, key=1, **options):
  """``kronjax.fit`` on the default dataset, batch 4, no progress bar."""
  return kronjax.fit(state, _dataset(), jax.random.PRNGKey(key), batch_size=4, progress=False,
                     **options)


STATE_FIELDS = {".projections", ".A_T", ".a", ".b", ".opt_state", ".step", ".key", ".index",
                ".P_eval", ".bias", ".w0_scale",
                ".fingerprint"}   # the dataset's (8,) uint32 fingerprint, not its data


def _manifest(path):
  return json.loads((path / "manifest" / "manifest.json").read_text())


def test_roundtrip_is_exact_with_metadata(tmp_path):
  state = _init(jax.random.key(3))  # typed key leaf
  state, _ = _fit(state, steps=5)
  meta = {"fit_key": jax.random.key(7), "raw_key": jax.random.PRNGKey(2), "batch_size": 4,
          "history": {"loss": np.arange(5, dtype=np.float32), "replays": [(3, {"active_capacity": 16})]},
          "note": None}
  path = checkpoint.save(tmp_path, state, meta)
  assert path.name == "ckpt_0000000005" and path.is_dir()
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left
  restored, got = checkpoint.load(tmp_path, like=_init(jax.random.key(3)))
  assert_same_tree(restored, state)
  assert restored.config == state.config and restored.index_kind == state.index_kind
  assert restored.plan == state.plan
  assert np.array_equal(restored.fingerprint, state.fingerprint)
  assert np.array_equal(state.fingerprint, _dataset().fingerprint)
  np.testing.assert_array_equal(jax.random.key_data(got["fit_key"]), jax.random.key_data(meta["fit_key"]))
  np.testing.assert_array_equal(got["raw_key"], meta["raw_key"])
  np.testing.assert_array_equal(got["history"]["loss"], meta["history"]["loss"])
  assert got["history"]["replays"] == [[3, {"active_capacity": 16}]]
  assert got["batch_size"] == 4 and got["note"] is None


def test_checkpoint_holds_the_state_only(tmp_path):
  """No data, labels or Gram in the checkpoint: its arrays are the state's leaves (and metadata)."""
  state = _init()
  path = checkpoint.save(tmp_path, state, {})
  manifest = _manifest(path)
  assert manifest["version"] == 4
  assert manifest["data_fingerprint"] == fingerprint_text(_dataset().fingerprint) is not None
  assert manifest["plan"] == dataclasses.asdict(state.plan)
  assert manifest["config"] == state.config.identity()
  entries = manifest["leaves"] + manifest["index_leaves"]
  fields = {re.match(r"\.\w+", entry["path"]).group() for entry in manifest["leaves"]}
  assert fields <= STATE_FIELDS - {".index"}, fields
  assert len(entries) == len(jax.tree.leaves(state))
  shapes = {tuple(entry["shape"]) for entry in entries}
  assert (N, N) not in shapes and (N, 8) not in shapes        # neither Gram is stored
  assert sorted(p.name for p in path.iterdir() if p.is_dir()) == ["index", "manifest", "state"]
  # Unsharded: the neuron axis is stored as is, one index for the whole network.
  assert manifest["rows"] == manifest["width"] == M and manifest["index_layout"] == "global"


def test_point_major_momentum_state_roundtrips(tmp_path):
  config = kronjax.Config(width=M, init="implicit")
  plan = kronjax.Plan(layout="points")   # P stored (n, m)
  tx = optax.sgd(0.5, momentum=0.9)
  state = _init(config=config, tx=tx, plan=plan)
  state, _ = _fit(state, steps=5)
  assert state.layout == "points" and state.projections.shape == (N, M)
  checkpoint.save(tmp_path, state, {})
  restored, _ = checkpoint.load(tmp_path, like=_init(config=config, tx=tx, plan=plan))
  assert_same_tree(restored, state)
  # Like capacities, the layout is not part of the network: a neuron-major `like` gets the
  # saved plan back, and with it the saved layout (never a transposed misreading).
  other, _ = checkpoint.load(tmp_path, like=_init(config=config, tx=tx,
                                                  plan=plan.replace(layout="neurons")))
  assert other.config == state.config and other.plan == state.plan and other.layout == "points"
  assert_same_tree(other, state)


def test_checkpoint_of_an_earlier_kronjax_is_refused(tmp_path):
  """Formats v1 and v2 were one ``ckpt-<step>.npz`` file; this kronjax reads v4 directories.
  Such a file is listed (a resume does not silently start afresh) and refused by name."""
  np.savez(tmp_path / "ckpt-0000000003.npz", __manifest__=np.frombuffer(
      json.dumps({"format": "kronjax-checkpoint", "version": 2}).encode(), np.uint8))
  assert checkpoint.latest_step(tmp_path) == 3
  with pytest.raises(ValueError, match=r"written by kronjax 0\.1 \(one .npz file, format "
                     r"v1 or v2\); this kronjax reads v4"):
    checkpoint.load(tmp_path, like=_init())
  with pytest.raises(ValueError, match=r"written by kronjax 0\.1"):
    _fit(_init(), steps=4, checkpoint_dir=tmp_path, resume=True)
  # A new run saving there leaves the old file alone (kronjax 0.3 no longer deletes files of
  # an earlier kronjax) and keeps the newest two of its own; its latest step loads.
  _fit(_init(), steps=4, checkpoint_dir=tmp_path, checkpoint_every=2)
  assert checkpoint.steps(tmp_path) == [2, 3, 4]
  assert (tmp_path / "ckpt-0000000003.npz").is_file()
  restored, _ = checkpoint.load(tmp_path, like=_init())
  assert int(restored.step) == 4


def test_checkpoint_of_version_3_is_refused(tmp_path):
  """A v3 checkpoint directory (written by kronjax 0.2: no plan in its manifest) is refused,
  naming the kronjax that wrote it."""
  state, _ = _fit(_init(), steps=2)
  path = checkpoint.save(tmp_path, state, {})
  manifest = _manifest(path)
  assert manifest["version"] == 4
  manifest["version"] = 3
  (path / "manifest" / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=r"written by kronjax 0\.2 \(checkpoint format v3\); "
                     r"this kronjax reads v4"):
    checkpoint.load(tmp_path, like=_init())


def test_restores_grown_capacity_plan(tmp_path):
  like = _init()
  grown = kronjax.with_plan(like, active_capacity=like.resolved_plan.active_capacity + 8,
                            candidate_capacity=M)
  grown, _ = _fit(grown, steps=3)
  checkpoint.save(tmp_path, grown, {})
  restored, _ = checkpoint.load(tmp_path, like=like)
  assert restored.config == grown.config == like.config
  assert restored.plan == grown.plan != like.plan
  assert_same_tree(restored, grown)
  # It keeps training exactly like the original.
  a, _ = _fit(grown, steps=2)
  b, _ = _fit(restored, steps=2)
  assert_same_tree(a, b)


def test_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, _ = _fit(_init(), steps=2)
  path = checkpoint.save("mine", state, {"x": 1})
  assert path == pathlib.Path("mine").absolute() / "ckpt_0000000002"
  restored, meta = checkpoint.load("mine", like=_init())
  assert_same_tree(restored, state)
  assert meta == {"x": 1}
  _fit(_init(), steps=2, checkpoint_dir="run")
  _, h = _fit(_init(), steps=4, checkpoint_dir="run", resume=True)
  assert h["resumed_from"] == 2 and checkpoint.steps("run") == [2, 4]


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
  assert_same_tree(restored, state)
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
  shutil.rmtree(checkpoint.checkpoint_path(directory, 6))
  return _fit(_init(), **options, checkpoint_dir=directory, checkpoint_every=4, resume=True)


def test_fit_checkpoints_resume_bit_for_bit(tmp_path):
  options = dict(steps=10, eval_every=2)
  full, h_full = _fit(_init(), **options)
  assert list(h_full["step"]) == list(range(1, 11)) and list(h_full["eval_step"]) == [2, 4, 6, 8, 10]
  resumed, h = _interrupted_and_resumed(tmp_path, **options)
  assert h["resumed_from"] == 4
  assert_same_tree(resumed, full)
  _assert_same_history(h, h_full)               # every step, the ones before the restart too
  assert checkpoint.steps(tmp_path) == [8, 10]
  # Resuming a run that has finished trains nothing and returns its state and history (the
  # history's float64 arrays come back float32: see the metadata test below).
  again, h_again = _fit(_init(), checkpoint_dir=tmp_path, resume=True, **options)
  assert h_again["resumed_from"] == 10
  assert_same_tree(again, full)
  _assert_same_history(h_again, h_full, dtypes=False)
  # Without a checkpoint, resume=True starts afresh (and equals the uninterrupted run).
  fresh, h_fresh = _fit(_init(), checkpoint_dir=tmp_path / "new", resume=True, **options)
  assert h_fresh["resumed_from"] == 0 and checkpoint.latest_step(tmp_path / "new") == 10
  assert_same_tree(fresh, full)
  _assert_same_history(h_fresh, h_full)


@pytest.mark.parametrize("every", ["eval_every", "log_every"])
def test_resumed_history_keeps_the_cadence_of_the_uninterrupted_run(tmp_path, every):
  options = {"steps": 10, every: 3}   # 3 does not divide the restart step 4
  full, h_full = _fit(_init(), **options)
  resumed, h = _interrupted_and_resumed(tmp_path, **options)
  assert_same_tree(resumed, full)
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
  assert_same_tree(resumed, full)


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


def _damage(path, damage):
  """Damages the checkpoint directory ``path`` as a crash, a bad disk or a bad copy would."""
  files = sorted((f for f in (path / "state").rglob("*") if f.is_file() and "/d/" in str(f)),
                 key=lambda f: f.stat().st_size)
  manifest = path / "manifest" / "manifest.json"
  if damage == "truncate_arrays":        # every array file cut short
    for f in files:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif damage == "drop_arrays":
    for f in files:
      f.unlink()
  elif damage == "drop_state":
    shutil.rmtree(path / "state")
  elif damage == "garbage_manifest":
    manifest.write_bytes(b"not json at all" * 10)
  elif damage == "truncate_manifest":
    manifest.write_bytes(manifest.read_bytes()[:-40])
  elif damage == "drop_manifest":
    manifest.unlink()
  elif damage == "drop_leaf":            # the manifest lists a leaf the files do not hold
    m = json.loads(manifest.read_text())
    m["leaves"][0]["name"] = "leaf_9999"
    manifest.write_text(json.dumps(m))
  elif damage == "metadata_array":
    m = json.loads(manifest.read_text())
    (name, entry), = m["metadata_arrays"].items()
    entry["data"] = entry["data"][:-8]
    manifest.write_text(json.dumps(m))
  elif damage == "step":                 # renamed: its state says another step
    path.rename(path.parent / "ckpt_0000000009")
  else:
    raise AssertionError(damage)


DAMAGE = ["truncate_arrays", "drop_arrays", "drop_state", "garbage_manifest", "truncate_manifest",
          "drop_manifest", "drop_leaf", "metadata_array", "step"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
  state, _ = _fit(_init(), steps=3)
  path = checkpoint.save(tmp_path, state, {"history": np.arange(3.0)})
  _damage(path, damage)
  with pytest.raises(ValueError, match=r"(?s)corrupt or incomplete.*Delete it to fall back"):
    checkpoint.load(tmp_path, like=_init())


def test_torn_write_never_shadows_the_last_good_checkpoint(tmp_path):
  """A save killed before its commit leaves a temporary directory: not listed, not loaded, and
  deleted by the next run's manager."""
  state, _ = _fit(_init(), steps=3)
  checkpoint.save(tmp_path, state, {})
  torn = tmp_path / "ckpt_0000000007.orbax-checkpoint-tmp"
  shutil.copytree(checkpoint.checkpoint_path(tmp_path, 3), torn)
  shutil.rmtree(torn / "state")
  assert checkpoint.steps(tmp_path) == [3]
  restored, _ = checkpoint.load(tmp_path, like=_init())
  assert_same_tree(restored, state)
  with checkpoint.Manager(tmp_path):
    pass
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000000003"]


def test_manager_saves_asynchronously_and_commits_before_close(tmp_path):
  state, _ = _fit(_init(), steps=2)
  with checkpoint.Manager(tmp_path, keep=2) as manager:
    path = manager.save(state, {"x": np.float64(1.5)})
    state, _ = _fit(state, steps=1)   # training goes on (the saved arrays stay intact)
    manager.save(state, {})
  assert path.name == "ckpt_0000000002" and checkpoint.steps(tmp_path) == [2, 3]
  restored, meta = checkpoint.load(tmp_path, like=_init(), step=2)
  assert meta == {"x": 1.5}
  again, _ = _fit(_init(), steps=2)
  assert_same_tree(restored, again)


SIGKILL_SCRIPT = r"""
import os, signal, sys
import jax, jax.numpy as jnp, optax
import kronjax
from kronjax import checkpoint
sys.path.insert(0, sys.argv[2])
import test_checkpoint as t
saves = []
original = checkpoint.Manager.save

def save_then_die(self, state, metadata=None):
  out = original(self, state, metadata)
  saves.append(out)
  if len(saves) == 2:   # the step-8 save is being written in the background: kill -9 now
    os.kill(os.getpid(), signal.SIGKILL)
  return out

checkpoint.Manager.save = save_then_die
t._fit(t._init(), steps=12, eval_every=2, checkpoint_dir=sys.argv[1], checkpoint_every=4)
"""


def test_sigkill_during_an_asynchronous_save_resumes_bit_for_bit(tmp_path):
  """A real ``kill -9`` of a training process while its step-8 checkpoint is being written:
  the resumed run (from step 8 if that save had committed, else from 4) equals the
  uninterrupted one, state and history."""
  here = pathlib.Path(__file__).resolve().parent
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SIGKILL_SCRIPT, str(tmp_path), str(here)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert checkpoint.latest_step(tmp_path) in (4, 8)
  full, h_full = _fit(_init(), steps=12, eval_every=2)
  resumed, h = _fit(_init(), steps=12, eval_every=2, checkpoint_dir=tmp_path,
                    checkpoint_every=4, resume=True)
  assert h["resumed_from"] in (4, 8)
  assert_same_tree(resumed, full)
  _assert_same_history(h, h_full)
  assert checkpoint.steps(tmp_path) == [8, 12]
  assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]   # the torn save was removed


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
  assert not np.array_equal(like.fingerprint, _init().fingerprint)
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
