"""Benchmark: checkpoints of a large momentum state, written and read by 1 and 2 processes.

State: m = 16384 neurons, n = 4096 points, float32, sgd with momentum: ``P``,
``A`` and the two momentum traces are (m, n) each (4 x 256 MiB = 1 GiB; ``a``,
``b``, the key, the step and the index are a few KiB). Their values are random
(``A`` and the traces too, not the zeros of a fresh init: tensorstore does not
write chunks that hold only the fill value, so zeros would flatter the numbers).

Measured per layout (1 process: the unsharded state of ``kronjax.fit`` without a
mesh; 2 processes on this machine: ``jax.distributed`` + gloo, the state
neuron-sharded, each process writing and reading its half):

* ``save``: ``kronjax.checkpoint.save`` (synchronous: until committed), and the
  checkpoint's size on disk;
* ``async``: ``Manager.save`` — how long the call blocks the training loop, and
  how long until the save is committed (``wait_until_finished``); the target is
  blocking < 10% of the save; and the training steps run while the save is
  written in the background: ``loop_extra_s`` is everything the save cost the
  loop (the call, plus the slowdown of the steps while it is written: on a CPU
  backend the writer holds the state's buffers, so the first step cannot donate
  them and writes fresh ones, and the writer shares the cores);
* ``restore``: ``kronjax.checkpoint.load`` onto the same layout, and across
  layouts (2 processes -> 1 process, 1 -> 2);
* ``compression`` (1 process): the same arrays written and read by orbax with
  zstd (its default) and without (what ``kronjax.checkpoint`` does);
* memory per device (kronjax/_src/distributed/sharding.py's module docstring): the
  formula, the compiled step's ``memory_analysis`` and the measured peak
  resident memory of the process over training, saving and restoring (the peak
  is reset after the initial state is sharded: ``kronjax.init`` still builds the
  whole state on every process first).

Writes go to the page cache of the machine's disk (no fsync is forced; the
directory is under ``--dir``, default a temporary directory).

    .venv/bin/python experiments/bench_checkpoint.py            # -> experiments/results/checkpoint.json
    .venv/bin/python experiments/bench_checkpoint.py --smoke    # tiny sizes, a minute
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _recipe():
  spec = importlib.util.spec_from_file_location("multiprocess_fit", HERE / "multiprocess_fit.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rss() -> dict[str, int]:
  """Resident and peak resident memory of this process (bytes)."""
  out = {}
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM"):
      out[key] = int(value.split()[0]) * 1024
  return out


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def _du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if xs else None


def _compression(state, base: pathlib.Path, repeats: int, phase) -> dict:
  """The state's arrays written and read by orbax with and without zstd (orbax's
  default; kronjax.checkpoint writes them uncompressed): why the format has none."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  arrays = {f"leaf_{i}": x for i, x in enumerate(jax.tree.leaves(state.replace(index=None)))
            if not jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)}
  abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in arrays.items()}
  out = {}
  for compressed in (True, False):
    saves, restores, size = [], [], None
    for r in range(repeats):
      d = base / f"compression_{compressed}_{r}"
      handler = ocp.PyTreeCheckpointHandler(use_compression=compressed)
      phase(f"compression{compressed}{r}")
      t = time.perf_counter()
      ocp.Checkpointer(handler).save(d, args=ocp.args.PyTreeSave(arrays))
      saves.append(time.perf_counter() - t)
      size = _du(d)
      phase(f"decompression{compressed}{r}")
      t = time.perf_counter()
      got = ocp.Checkpointer(handler).restore(d, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args={k: ocp.ArrayRestoreArgs(sharding=a.sharding)
                                       for k, a in abstract.items()}))
      jax.block_until_ready(got)
      restores.append(time.perf_counter() - t)
      del got
      shutil.rmtree(d)
    out["zstd" if compressed else "none"] = {"save_s": _median(saves), "restore_s": _median(restores),
                                             "size_bytes": size, "save_times_s": saves,
                                             "restore_times_s": restores}
  return out


def worker(args) -> dict:
  """One process's measurements (``args.processes`` processes in all)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  import kronjax  # pylint: disable=g-import-not-at-top
  from kronjax import checkpoint, sharding  # pylint: disable=g-import-not-at-top

  procs = jax.process_count()
  me = jax.process_index()
  sync = (lambda name: multihost_utils.sync_global_devices(name)) if procs > 1 else (lambda _: None)
  base = pathlib.Path(args.dir)
  rss0 = _rss()["VmRSS"]

  m, n, dims, B = args.m, args.n, tuple(args.dims), args.batch
  key = jax.random.PRNGKey(0)
  data = kronjax.data.synthetic(key, n, dims)
  labels = jax.random.normal(jax.random.fold_in(key, 1), (n,), jnp.float32)
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=m, init="explicit", threshold=0.5)
  tx = optax.sgd(0.1, momentum=0.9)
  state = kronjax.init(key, config, dataset, tx, plan=kronjax.Plan(active_capacity=64))

  def noise(i, x):   # incompressible, and never the all-zero fill value
    if getattr(x, "ndim", 0) < 2:
      return x
    return (1e-3 * jax.random.normal(jax.random.fold_in(key, 100 + i), x.shape)).astype(x.dtype)
  leaves, treedef = jax.tree.flatten(state.opt_state)
  state = state.replace(A_T=noise(0, state.A_T),
                        opt_state=jax.tree.unflatten(treedef, [noise(i + 1, x) for i, x in enumerate(leaves)]))
  big = sum(1 for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) >= 2 and x.size >= m * n)
  state_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                        if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)))
  rss_init = _rss()
  if procs > 1:
    mesh = sharding.neuron_mesh()
    state = sharding.shard_state(state, mesh)
    step = sharding.compiled_step(mesh)
    dataset = jax.device_put(dataset, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  else:
    mesh = None
    step = kronjax.jit_train_step
  jax.block_until_ready(state)
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  peak_reset = _reset_peak()
  rss_sharded = _rss()["VmRSS"]
  batches = [jnp.asarray(b) for b in kronjax.batch_schedule(key, n, B, 12)]

  def run(state, k, offset=0):
    times = []
    for i in range(k):
      t = time.perf_counter()
      state, metrics = step(state, dataset, batches[(offset + i) % len(batches)])
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
    return state, times

  state, _ = run(state, 2)                     # compile

  memory = {"rss_baseline_bytes": rss0, "rss_after_init_bytes": rss_init["VmRSS"],
            "peak_after_init_bytes": rss_init["VmHWM"], "rss_sharded_bytes": rss_sharded,
            "peak_reset": peak_reset}

  def phase(name):
    """Starts a measured phase: the writes of earlier phases flushed, the peak reset."""
    os.sync()
    sync(name)
    _reset_peak()
    return _rss()["VmRSS"]

  def phase_end(name, start_rss):
    memory[f"{name}_peak_over_start_bytes"] = _rss()["VmHWM"] - start_rss

  # Training steps alone.
  start = phase("train")
  state, step_times = run(state, args.steps)
  phase_end("train", start)
  out = {"process": me, "processes": procs, "devices": jax.device_count(), "m": m, "n": n,
         "m_pad": int(state.P.shape[0]), "dims": list(dims), "batch": B,
         "update_path": state.update_path(B), "state_bytes": state_bytes,
         "big_arrays": big, "step_s": _median(step_times), "step_times_s": step_times,
         "loadavg_1min_start": os.getloadavg()[0]}

  # Synchronous saves (each into a fresh directory; only the first is kept, for restores).
  save_s, sizes = [], []
  for r in range(args.repeats):
    d = base / f"sync_p{procs}_{r}"
    start = phase(f"save{r}")
    t = time.perf_counter()
    checkpoint.save(d, state, {"r": r})
    save_s.append(time.perf_counter() - t)
    phase_end("save", start)
    sync(f"saved{r}")
    if me == 0:
      sizes.append(_du(d))
      if r:
        shutil.rmtree(d)
  out["save_s"] = save_s

  # Asynchronous saves: what the loop waits for, what the save takes.
  blocking, committed = [], []
  for r in range(args.repeats):
    d = base / f"async_p{procs}_{r}"
    phase(f"async{r}")
    with checkpoint.Manager(d) as manager:
      t = time.perf_counter()
      manager.save(state, {"r": r})
      t_block = time.perf_counter() - t
      manager.wait_until_finished()
      blocking.append(t_block)
      committed.append(time.perf_counter() - t)
    sync(f"asynced{r}")
    if me == 0:
      shutil.rmtree(d)
  out["async_blocking_s"] = blocking
  out["async_committed_s"] = committed
  out["async_blocking_fraction"] = _median(blocking) / _median(committed)
  # The training loop around an asynchronous save: steps run while it is written.
  d = base / f"loop_p{procs}"
  phase("loop")
  with checkpoint.Manager(d) as manager:
    t = time.perf_counter()
    manager.save(state, {})
    t_block = time.perf_counter() - t
    state, during = run(state, args.steps, offset=3)
    t_steps = time.perf_counter() - t
    manager.wait_until_finished()
    t_commit = time.perf_counter() - t
  sync("looped")
  if me == 0:
    shutil.rmtree(d)
  # What the save cost the loop: the call, plus the steps' slowdown while the save is
  # written (on CPU the writer holds the state's buffers, so the first step cannot
  # donate them and allocates fresh ones; the writer also shares the cores).
  extra = t_block + sum(during) - len(during) * out["step_s"]
  out["loop"] = {"save_call_s": t_block, "steps": args.steps, "steps_done_s": t_steps,
                 "committed_s": t_commit, "step_s_during_save": _median(during),
                 "step_times_during_save_s": during, "step_s_without_save": out["step_s"],
                 "first_step_after_save_s": during[0], "loop_extra_s": extra}

  # Restore onto the same layout, and (2 processes) the 1-process checkpoint onto this mesh.
  restore_s = []
  for r in range(args.repeats):
    start = phase(f"restore{r}")
    t = time.perf_counter()
    restored, _ = checkpoint.load(base / f"sync_p{procs}_0", like=state)
    jax.block_until_ready(restored)
    restore_s.append(time.perf_counter() - t)
    phase_end("restore", start)
    out["restored_step"] = int(np.asarray(restored.step.addressable_data(0)))
    del restored
  out["restore_s"] = restore_s
  if procs == 1:
    out["compression"] = _compression(state, base, args.repeats, phase)
  one = base / "sync_p1_0"
  if procs > 1 and one.is_dir():
    phase("cross")
    t = time.perf_counter()
    restored, _ = checkpoint.load(one, like=state)
    jax.block_until_ready(restored)
    out["restore_from_1_process_s"] = time.perf_counter() - t
    del restored
  out["loadavg_1min_end"] = os.getloadavg()[0]

  # Memory per device.
  out["memory"] = memory
  rows = int(state.P.shape[0]) // (jax.device_count() if procs > 1 else 1)   # rows per device
  f = 4
  formula = {"P": rows * n * f, "A": rows * n * f, "traces": 2 * rows * n * f,
             "a_b_index": rows * f + 8, "gram": n * n * f,
             "factors": int(sum(x.size for x in data.factors)) * f}
  formula["state"] = formula["P"] + formula["A"] + formula["traces"]
  formula["total"] = formula["state"] + formula["gram"] + formula["factors"]
  donated = step if procs > 1 else jax.jit(kronjax.train_step, donate_argnums=0)  # as fit's step
  compiled = donated.lower(state, dataset, batches[0]).compile()
  analysis = compiled.memory_analysis()
  out["memory"]["formula_per_device_bytes"] = formula
  if analysis is not None:
    out["memory"]["compiled_step"] = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes)}
  if me == 0:
    out["size_bytes"] = sizes
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="m=1024, n=256: a quick run")
  p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
  p.add_argument("--out", default=None, help="JSON path (default experiments/results/checkpoint[_smoke].json)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=4)
  # Worker mode (one process of a run): set by main itself.
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  p.add_argument("--num-processes", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--m", type=int, default=16384, help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, default=4096, help=argparse.SUPPRESS)
  p.add_argument("--dims", type=int, nargs="+", default=[8, 8], help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.smoke:
    args.m, args.n = 1024, 256
  if args.worker:
    if args.num_processes:
      _recipe().initialize(args.coordinator, args.num_processes, args.process_id)
    out = worker(args)
    print("RESULT " + json.dumps(out), flush=True)
    return

  recipe = _recipe()
  base = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="kronjax_bench_checkpoint_"))
  base.mkdir(parents=True, exist_ok=True)
  common = ["--worker", "--dir", str(base), "--repeats", str(args.repeats), "--steps",
            str(args.steps), "--m", str(args.m), "--n", str(args.n), "--batch", str(args.batch),
            "--dims", *map(str, args.dims)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  runs = {}
  import subprocess  # pylint: disable=g-import-not-at-top
  single = subprocess.run([sys.executable, __file__, *common, "--processes", "1"], env=env,
                          capture_output=True, text=True)
  if single.returncode:
    raise SystemExit(f"1-process run failed:\n{single.stderr[-5000:]}")
  runs["1_process"] = [json.loads(l[7:]) for l in single.stdout.splitlines() if l.startswith("RESULT ")]
  double = recipe.launch([*common, "--processes", "2"], 2, script=__file__, env=env, timeout=3600)
  for i, r in enumerate(double):
    if r.returncode:
      raise SystemExit(f"2-process run, process {i} failed:\n{r.stderr[-5000:]}")
  runs["2_processes"] = [json.loads([l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
                         for r in double]

  # 2 processes -> 1: this process reads the 2-process checkpoint onto one device.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import kronjax  # pylint: disable=g-import-not-at-top
  from kronjax import checkpoint  # pylint: disable=g-import-not-at-top
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(0)
  data = kronjax.data.synthetic(key, args.n, tuple(args.dims))
  dataset = kronjax.Dataset(data, jax.random.normal(jax.random.fold_in(key, 1), (args.n,), jnp.float32))
  like = kronjax.init(key, kronjax.Config(width=args.m, init="explicit", threshold=0.5), dataset,
                      optax.sgd(0.1, momentum=0.9), plan=kronjax.Plan(active_capacity=64))
  t = time.perf_counter()
  restored, _ = checkpoint.load(base / "sync_p2_0", like=like)
  jax.block_until_ready(restored)
  cross = {"restore_2_processes_to_1_s": time.perf_counter() - t}
  del restored, like

  def summary(rs):
    r = rs[0]
    return {"save_s": _median(r["save_s"]), "restore_s": _median(r["restore_s"]),
            "size_bytes": _median(r["size_bytes"]), "state_bytes": r["state_bytes"],
            "async_blocking_s": _median(r["async_blocking_s"]),
            "async_committed_s": _median(r["async_committed_s"]),
            "async_blocking_fraction": r["async_blocking_fraction"],
            "step_s": r["step_s"], "step_s_during_save": r["loop"]["step_s_during_save"],
            "first_step_after_save_s": r["loop"]["first_step_after_save_s"],
            "loop_extra_s": r["loop"]["loop_extra_s"],
            "loop_extra_fraction_of_save": r["loop"]["loop_extra_s"] / _median(r["async_committed_s"]),
            "train_peak_over_start_bytes_per_process": [
                x["memory"]["train_peak_over_start_bytes"] for x in rs],
            "resident_after_sharding_over_baseline_bytes_per_process": [
                x["memory"]["rss_sharded_bytes"] - x["memory"]["rss_baseline_bytes"] for x in rs],
            "memory_formula_per_device_bytes": r["memory"]["formula_per_device_bytes"],
            "compression": {k: {"save_s": v["save_s"], "restore_s": v["restore_s"],
                                "size_bytes": v["size_bytes"]}
                            for k, v in r.get("compression", {}).items()},
            "compiled_step_bytes": r["memory"].get("compiled_step")}

  payload = {
      "benchmark": "checkpoint save / restore, 1 and 2 processes",
      **timing.provenance(),
      "settings": {"m": args.m, "n": args.n, "dims": args.dims, "batch": args.batch,
                   "dtype": "float32", "optimizer": "sgd(0.1, momentum=0.9)",
                   "repeats": args.repeats, "compression": "none (see kronjax/_src/distributed/checkpoint.py)"},
      "summary": {"1_process": summary(runs["1_process"]), "2_processes": summary(runs["2_processes"]),
                  **cross,
                  "restore_1_process_to_2_s": runs["2_processes"][0].get("restore_from_1_process_s")},
      "runs": runs,
  }
  out = args.out or RESULTS / ("checkpoint_smoke.json" if args.smoke else "checkpoint.json")
  timing.write_json(out, payload)
  print(json.dumps(payload["summary"], indent=1))
  print("wrote", out)
  if args.dir is None:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
