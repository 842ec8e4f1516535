"""Two processes on localhost train one network: ``experiments/multiprocess_fit.py``, run as tests.

Each launch starts two Python processes (``jax.distributed`` with a free port,
gloo CPU collectives, one CPU device each: a 2-device mesh over 2 processes),
exactly as the recipe runs on N hosts. Checked here (float64):

* two-process ``fit`` equals single-process training (< 1e-10) for sgd (sparse
  path, ``gram="factors"``) and momentum (full path, precomputed Gram), with eval
  data, at a width the device count does not divide (61 on 2);
* a two-process run killed with SIGKILL while a checkpoint is being written, then
  resumed, equals the uninterrupted two-process run bit for bit;
* checkpoints move between layouts: 2 processes -> 1 (loaded here), 1 -> 2;
* every bad checkpoint (corrupt, incomplete, torn, from an earlier kronjax,
  another dataset / optimizer / width, or one process's shards missing) is
  refused with a ValueError by *both* processes;
* sweeps: ``kronjax.sweep.fit`` refuses a mesh, and runs (with checkpoints and
  resume) under two processes, each training every member;
* the compiled two-process step moves exactly ``kronjax.sharding.estimated_bytes``
  (both update paths); ``unshard_state`` gathers to every process.

The launches share a persistent compilation cache, so most of their compilations
happen once.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "multiprocess_fit.py"
_spec = importlib.util.spec_from_file_location("multiprocess_fit", RECIPE)
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

pytestmark = [pytest.mark.usefixtures("x64_module"),
              pytest.mark.slow]  # left out of make test-fast

# width 61 on 2 devices: padded to 62 with a never-firing neuron.
COMMON = ["--x64", "--width", "61", "--n", "48", "--eval", "8", "--steps", "12", "--eval-every",
          "4", "--batch-size", "8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  import os  # pylint: disable=g-import-not-at-top
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu",
              PYTHONPATH=str(ROOT))


def _launch(argv, env, script=None, ok=True):
  results = recipe.launch([str(a) for a in argv], 2, script=script, env=env, timeout=300)
  if ok:
    for i, r in enumerate(results):
      assert r.returncode == 0, f"process {i} failed ({r.returncode}):\n{r.stderr[-6000:]}"
  return results


def _summary(results):
  (line,) = [l for l in results[0].stdout.splitlines() if l.startswith("RESULT ")]
  return json.loads(line[len("RESULT "):])


def _single(argv, **overrides):
  """The same problem trained in this process, on one device, no mesh."""
  args = recipe.parser().parse_args([str(a) for a in argv])
  state, dataset, key = recipe.make_problem(args)
  options = {k: v for k, v in recipe.fit_options(args).items()
             if k not in ("checkpoint_dir", "checkpoint_every", "keep", "resume")}
  options.update(overrides)
  return (*kronjax.fit(state, dataset, key, **options), state, dataset, key)


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def _npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _leaves(state):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out["state" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


@pytest.fixture(scope="module")
def momentum_run(env, tmp_path_factory):
  """The uninterrupted two-process momentum run, checkpointing every 4 steps."""
  tmp = tmp_path_factory.mktemp("momentum")
  argv = COMMON + ["--optimizer", "momentum", "--checkpoint-dir", tmp / "ckpt",
                   "--checkpoint-every", 4]
  results = _launch(argv + ["--out", tmp / "out.npz"], env)
  return argv, tmp, _summary(results), _npz(tmp / "out.npz")


def _assert_matches_single(got, argv):
  ref, h_ref, *_ = _single(argv)
  leaves = _leaves(ref)
  for name in ("state.projections", "state.A_T", "state.a", "state.P_eval"):
    assert got[name].shape == leaves[name].shape, name            # padding stripped
    assert _rel(got[name], leaves[name]) < 1e-10, name
  for name in ("loss", "active", "eval_loss", "eval_accuracy"):
    assert _rel(got["history." + name], h_ref[name]) < 1e-10, name
  np.testing.assert_array_equal(got["history.step"], h_ref["step"])
  np.testing.assert_array_equal(got["state.step"], leaves["state.step"])


def test_two_process_sgd_equals_single_process(env, tmp_path):
  """Plain sgd on the sparse path, with the Gram never formed (``gram="factors"``: what a
  dataset whose ``n x n`` Gram does not fit one host uses)."""
  argv = COMMON + ["--optimizer", "sgd", "--lr", "0.5", "--update", "sparse", "--gram", "factors"]
  summary = _summary(_launch(argv + ["--out", tmp_path / "out.npz"], env))
  assert summary["processes"] == summary["devices"] == 2
  assert (summary["m"], summary["m_pad"]) == (61, 62)
  _assert_matches_single(_npz(tmp_path / "out.npz"), argv)


def test_two_process_momentum_equals_single_process(momentum_run):
  argv, tmp, summary, got = momentum_run
  assert (summary["m"], summary["m_pad"], summary["processes"]) == (61, 62, 2)
  _assert_matches_single(got, argv)
  # Its checkpoints were written shard by shard by both processes; this one
  # process restores the last one onto one device (2 processes -> 1): exactly
  # the state the two processes gathered at the end.
  assert checkpoint.steps(tmp / "ckpt") == [8, 12]
  manifest = json.loads((checkpoint.checkpoint_path(tmp / "ckpt", 12) / "manifest" /
                         "manifest.json").read_text())
  assert (manifest["processes"], manifest["devices"], manifest["rows"]) == (2, 2, 62)
  assert sorted(p.name for p in (checkpoint.checkpoint_path(tmp / "ckpt", 12) / "state").iterdir()
                if p.name.startswith("ocdbt.process_")) == ["ocdbt.process_0", "ocdbt.process_1"]
  _, _, like, dataset, key = _single(argv, steps=1)
  restored, meta = checkpoint.load(tmp / "ckpt", like=like)
  assert restored.P.shape == (61, 48)
  for name, value in _leaves(restored).items():
    if not name.startswith("state.index"):
      np.testing.assert_array_equal(value, got[name], err_msg=name)
  np.testing.assert_array_equal(meta["history"]["values"]["loss"][:, 0], got["history.loss"])
  # ... and trains on from it on one device as the single-process run does.
  longer, _, *_ = _single(argv, steps=16)
  more, _ = kronjax.fit(restored, dataset, key, batch_size=8, steps=4, progress=False)
  assert _rel(more.P, longer.P) < 1e-10 and _rel(more.A, longer.A) < 1e-10


KILLER = r'''
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("multiprocess_fit", "@RECIPE@")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
from kronjax._src.distributed import checkpoint
original = checkpoint.Manager.save
saves = []

def save_then_die(self, state, metadata=None):
  out = original(self, state, metadata)
  saves.append(out)
  if len(saves) == 2:   # the step-8 checkpoint is being written in the background: kill -9
    os.kill(os.getpid(), signal.SIGKILL)
  return out

checkpoint.Manager.save = save_then_die
sys.exit(recipe.main())
'''


def test_two_processes_killed_mid_save_resume_bit_for_bit(momentum_run, env, tmp_path):
  _, _, _, uninterrupted = momentum_run
  ckpt = tmp_path / "ckpt"
  argv = COMMON + ["--optimizer", "momentum", "--checkpoint-dir", ckpt, "--checkpoint-every", 4]
  killer = tmp_path / "killer.py"
  killer.write_text(KILLER.replace("@RECIPE@", str(RECIPE)))
  killed = _launch(argv, env, script=killer, ok=False)
  assert [r.returncode for r in killed] == [-9, -9], [r.stderr[-3000:] for r in killed]
  assert checkpoint.latest_step(ckpt) in (4, 8)            # the step-12 save never happened
  summary = _summary(_launch(argv + ["--resume", "--out", tmp_path / "out.npz"], env))
  assert summary["resumed_from"] in (4, 8)
  got = _npz(tmp_path / "out.npz")
  assert got.keys() == uninterrupted.keys()
  for name in got:   # state (index included) and history, bit for bit
    np.testing.assert_array_equal(got[name], uninterrupted[name], err_msg=name)
  assert checkpoint.steps(ckpt) == [8, 12]
  assert not [p for p in ckpt.iterdir() if "tmp" in p.name]


WORKER = r'''
import importlib.util, json, os, pathlib, shutil, sys
spec = importlib.util.spec_from_file_location("multiprocess_fit", "@RECIPE@")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
work = pathlib.Path("@WORK@")
args = recipe.parser().parse_args(sys.argv[1:])
recipe.initialize(args.coordinator, args.num_processes, args.process_id)
import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_enable_x64", True)
from jax.experimental import multihost_utils
import kronjax
from kronjax import checkpoint, sharding
from kronjax.experiments import hlo

me = jax.process_index()
out = {"process": me}
state, dataset, key = recipe.make_problem(args)
mesh = sharding.neuron_mesh()
fit = dict(batch_size=8, progress=False)

def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))

# 1 -> 2: the single-process checkpoint written by the test, restored onto the 2-process
# mesh (each process reads its rows), trained on; equals one process training on.
ref6, _ = kronjax.fit(state, dataset, key, steps=6, **fit)
ref12, _ = kronjax.fit(state, dataset, key, steps=12, **fit)
like = sharding.shard_state(state, mesh)
restored, meta = checkpoint.load(work / "single", like=like)
out["restored_spec"] = str(restored.projections.sharding.spec)
out["restored_rows"] = int(restored.P.shape[0])
back = sharding.unshard_state(restored)     # gathered to this process
out["one_to_two_exact"] = all(bool(np.array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(ref6, f))))
                              for f in ("P", "A", "a", "P_eval"))
more, _ = kronjax.fit(back, dataset, key, steps=6, mesh=mesh, **fit)
more = sharding.unshard_state(more)
out["one_to_two_train_err"] = max(rel(more.P, ref12.P), rel(more.A, ref12.A))

# resync under the mesh: each process recomputes P = P0 + A K whole, then keeps its rows.
synced, _ = kronjax.fit(state, dataset, key, steps=4, resync_every=2, mesh=mesh, **fit)
synced_ref, _ = kronjax.fit(state, dataset, key, steps=4, resync_every=2, **fit)
out["resync_err"] = rel(sharding.unshard_state(synced).P, synced_ref.P)

# The compiled two-process step moves what sharding.estimated_bytes says, on both paths.
out["collectives"] = {}
batch = jnp.arange(8, dtype=jnp.int32)
for update in ("sparse", "full"):
  s = sharding.shard_state(kronjax.with_plan(state, update=update), mesh)
  ops = hlo.step_collectives(s, dataset, batch, mesh)
  est = sharding.estimated_bytes(8, state.config.num_classes, float_bytes=8, update=update)
  out["collectives"][update] = {"ops": sorted({o["op"] for o in ops}),
                                "bytes": sum(o["bytes"] for o in ops), "estimate": est["total"]}

# A good 2-process checkpoint, then every way of spoiling it: both processes must refuse.
trained, _ = kronjax.fit(state, dataset, key, steps=3, mesh=mesh, **fit)
good = work / "good"
checkpoint.save(good, trained, {"note": "good"})
names = ["none", "truncate_arrays", "drop_manifest", "garbage_manifest", "drop_state",
         "drop_process_1_shards", "legacy", "torn", "dataset", "optimizer", "width"]

def spoil(case, d):
  path = checkpoint.checkpoint_path(d, 3)
  state_dir = path / "state"
  manifest = path / "manifest" / "manifest.json"
  if case == "truncate_arrays":
    for f in state_dir.rglob("*"):
      if f.is_file() and "/d/" in str(f):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif case == "drop_manifest":
    manifest.unlink()
  elif case == "garbage_manifest":
    manifest.write_bytes(b"\x00garbage" * 20)
  elif case == "drop_state":
    shutil.rmtree(state_dir)
  elif case == "drop_process_1_shards":   # only process 1's rows are gone
    shutil.rmtree(state_dir / "ocdbt.process_1")
  elif case == "legacy":
    shutil.rmtree(path)
    (d / "ckpt-0000000003.npz").write_bytes(b"PK")
  elif case == "torn":                    # a newer save torn by a crash: ignored
    shutil.copytree(path, d / "ckpt_0000000007.orbax-checkpoint-tmp")

for case in names:
  d = work / case
  if me == 0:
    shutil.copytree(good, d)
    spoil(case, d)
  multihost_utils.sync_global_devices(case)
  like = sharding.shard_state(state, mesh)
  if case == "dataset":
    other = kronjax.Dataset(dataset.data, jnp.roll(dataset.labels, 1), eval_data=dataset.eval_data,
                            eval_labels=dataset.eval_labels)
    like = sharding.shard_state(kronjax.init(jax.random.PRNGKey(5), state.config, other,
                                             state.tx.tx, plan=state.plan), mesh)
  elif case == "optimizer":
    like = sharding.shard_state(kronjax.init(jax.random.PRNGKey(5), state.config, dataset,
                                             optax.sgd(0.1), plan=state.plan), mesh)
  elif case == "width":
    like = sharding.shard_state(kronjax.init(jax.random.PRNGKey(5), state.config.replace(width=64),
                                             dataset, state.tx.tx, plan=state.plan), mesh)
  try:
    got, meta = checkpoint.load(d, like=like)
    same = all(bool(np.array_equal(np.asarray(x), np.asarray(y))) for x, y in
               zip(jax.tree.leaves(sharding.unshard_state(got)), jax.tree.leaves(sharding.unshard_state(trained)))
               if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))
    out[case] = "loaded exact" if same and meta == {"note": "good"} else "loaded wrong"
  except ValueError as e:
    out[case] = "ValueError: " + str(e)

# Sweeps: no mesh (a sweep is vmapped over its members); under two processes each
# process trains every member, and checkpoints/resume work (process 0 writes them).
# (A failure here is reported by test_sweeps_under_two_processes, not by every test.)
# Both processes get here: each runs the same collectives in the same order up to an error.
try:
  members = kronjax.sweep.grid(learning_rate=[0.1, 0.3])
  stacked = kronjax.sweep.init(state.config, dataset, members, plan=state.plan)
  try:
    kronjax.sweep.fit(stacked, dataset, key, steps=2, mesh=mesh, **fit)
    out["sweep_mesh"] = "accepted"
  except ValueError as e:
    out["sweep_mesh"] = str(e)
  full, h_full = kronjax.sweep.fit(stacked, dataset, key, steps=6, **fit)
  kronjax.sweep.fit(stacked, dataset, key, steps=4, checkpoint_dir=work / "sweep", checkpoint_every=2, **fit)
  resumed, h = kronjax.sweep.fit(stacked, dataset, key, steps=6, checkpoint_dir=work / "sweep",
                                 checkpoint_every=2, resume=True, **fit)
  out["sweep_resumed_from"] = h["resumed_from"]
  out["sweep_resume_exact"] = all(
      bool(np.array_equal(np.asarray(x), np.asarray(y))) for x, y in
      zip(jax.tree.leaves(resumed), jax.tree.leaves(full)) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  ) and bool(np.array_equal(h["loss"], h_full["loss"]))
except Exception:
  import traceback
  out["sweep_error"] = traceback.format_exc()
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory, once_per_run):
  def run():
    work = tmp_path_factory.mktemp("worker")
    argv = COMMON + ["--optimizer", "momentum"]
    ref6, _, *_ = _single(argv, steps=6, eval_every=0)
    checkpoint.save(work / "single", ref6, {"from": "one process"})
    script = work / "worker.py"
    script.write_text(WORKER.replace("@RECIPE@", str(RECIPE)).replace("@WORK@", str(work)))
    results = _launch(argv, env, script=script)
    return [json.loads([l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
            for r in results]
  return once_per_run("test_multiprocess.worker", run)


def test_resync_under_two_processes(worker):
  for res in worker:
    assert res["resync_err"] < 1e-10


def test_one_process_checkpoint_restores_onto_two_processes(worker):
  for res in worker:
    assert res["restored_spec"] in ("PartitionSpec('neurons',)", "P('neurons',)",  # neuron-major P
                                  "PartitionSpec(None, 'neurons')", "P(None, 'neurons')")  # point-major
    assert res["restored_rows"] == 62               # re-padded for 2 devices
    assert res["one_to_two_exact"]
    assert res["one_to_two_train_err"] < 1e-10


@pytest.mark.perf
@pytest.mark.parametrize("update", ["sparse", "full"])
def test_two_process_step_all_reduce_equals_estimate(worker, update):
  for res in worker:
    c = res["collectives"][update]
    assert c["ops"] == ["all-reduce"] and c["bytes"] == c["estimate"], c


BAD = {"truncate_arrays": "corrupt or incomplete", "drop_manifest": "corrupt or incomplete",
       "garbage_manifest": "corrupt or incomplete", "drop_state": "corrupt or incomplete",
       "drop_process_1_shards": "corrupt or incomplete|refused by process",
       "legacy": r"written by kronjax 0\.1", "dataset": "another dataset", "optimizer": "different optimizer",
       "width": "config.width"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_refused_by_both_processes(worker, case):
  import re  # pylint: disable=g-import-not-at-top
  for res in worker:
    assert res[case].startswith("ValueError: "), (res["process"], res[case])
    assert re.search(BAD[case], res[case]), (res["process"], res[case])
  if case == "drop_process_1_shards":   # process 1 found the damage; process 0 was told
    assert "corrupt or incomplete" in worker[1][case]
    assert "refused by process(es) [1]" in worker[0][case]


def test_good_and_torn_checkpoints_load_on_both_processes(worker):
  for res in worker:
    assert res["none"] == "loaded exact" and res["torn"] == "loaded exact"


def test_sweeps_under_two_processes(worker):
  for res in worker:
    assert "sweep_error" not in res, (res["process"], res.get("sweep_error"))
    assert "takes no mesh" in res["sweep_mesh"]
    assert res["sweep_resumed_from"] == 4 and res["sweep_resume_exact"]
