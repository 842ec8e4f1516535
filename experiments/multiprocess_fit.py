"""Multi-process training: one network, its neurons sharded over the devices of N processes.

The same script runs on every host of a cluster, and as N local processes on one
machine (CPU devices, gloo collectives: how the test suite runs it):

    # on each of N hosts (process I of N; HOST0 runs the coordinator):
    python experiments/multiprocess_fit.py --coordinator HOST0:1234 --num-processes N --process-id I
    # N processes on this machine (a free port is picked):
    python experiments/multiprocess_fit.py --local 2 --steps 40 --checkpoint-dir /tmp/run --checkpoint-every 10
    # ... killed (even kill -9)? The same command with --resume continues bit for bit.

What each process does (``run``):

1. ``jax.distributed.initialize`` (``initialize``); ``jax.devices()`` then lists the
   devices of every process and ``kronjax.sharding.neuron_mesh()`` spans them all.
2. Builds the same dataset from the same seed (``make_problem``): the data is
   replicated, every process holds all of it (a Gram too large for one host:
   ``--gram factors`` keeps only the factors, see kronjax/_src/distributed/sharding.py).
3. ``kronjax.fit(state, dataset, key, ..., mesh=mesh, checkpoint_dir=...)``: every
   process derives the same batch indices from the key (``kronjax.batch_schedule``),
   each holds and updates its rows of ``P``, ``A``, ``a`` and the optimizer
   traces, and one step moves only the all-reduce of the ``(B, C)`` outputs.
   Checkpoints are written shard by shard by every process (``kronjax.checkpoint``),
   never gathered; ``resume=True`` reads each process's shards back, whatever
   device count wrote them.
4. ``kronjax.sharding.unshard_state`` gathers the trained network into every
   process's memory; process 0 writes ``--out`` (an ``.npz`` of the state's leaves
   and the history) and prints a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Sequence


def free_port() -> int:
  """A TCP port nothing listens on now (for the coordinator of local processes)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def initialize(coordinator: str, num_processes: int, process_id: int, *, cpu: bool = True) -> None:
  """``jax.distributed.initialize`` for process ``process_id`` of ``num_processes``.

  ``cpu``: the processes' devices are CPUs, whose cross-process collectives need
  gloo (GPU/TPU backends bring their own). Call before any other use of jax.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def make_problem(args: argparse.Namespace):
  """``(state, dataset, key)``: the same on every process (everything derives from ``--seed``)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import kronjax  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(args.seed)
  dims = tuple(int(d) for d in args.dims.split(","))
  classes = args.classes
  task = "regression" if classes == 1 else "classification"
  total = args.n + args.eval
  data, labels = kronjax.data.planted(key, total, dims, task=task,
                                      num_classes=max(classes, 2))
  train = jnp.arange(args.n)
  held = jnp.arange(args.n, total)
  dataset = kronjax.Dataset(data.subset(train), labels[:args.n],
                            eval_data=data.subset(held) if args.eval else None,
                            eval_labels=labels[args.n:] if args.eval else None, gram=args.gram)
  config = kronjax.Config(width=args.width, threshold=args.threshold,
                          loss="mse" if classes == 1 else "softmax", num_classes=classes,
                          init="implicit")
  plan = kronjax.Plan(active_capacity=args.active_capacity, update=args.update)
  if args.optimizer == "momentum":
    tx = optax.sgd(args.lr, momentum=0.9)
  else:
    tx = optax.sgd(args.lr)
  state = kronjax.init(jax.random.fold_in(key, 1), config, dataset, tx, plan=plan)
  return state, dataset, jax.random.fold_in(key, 2)


def fit_options(args: argparse.Namespace) -> dict[str, Any]:
  """``kronjax.fit``'s keyword arguments (without the mesh) for these arguments."""
  out = {"batch_size": args.batch_size, "steps": args.steps, "progress": False,
         "eval_every": args.eval_every if args.eval else 0}
  if args.checkpoint_dir:
    out.update(checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
               keep=args.keep, resume=args.resume)
  return out


def run(args: argparse.Namespace) -> dict[str, Any]:
  """One process's part of the training run (after ``initialize``)."""
  import jax  # pylint: disable=g-import-not-at-top
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  import numpy as np  # pylint: disable=g-import-not-at-top

  import kronjax  # pylint: disable=g-import-not-at-top
  from kronjax import sharding  # pylint: disable=g-import-not-at-top

  state, dataset, key = make_problem(args)
  mesh = sharding.neuron_mesh()   # every device of every process
  t0 = time.perf_counter()
  trained, history = kronjax.fit(state, dataset, key, mesh=mesh, **fit_options(args))
  seconds = time.perf_counter() - t0
  network = sharding.unshard_state(trained)   # gathered into every process's memory
  summary = {"process": jax.process_index(), "processes": jax.process_count(),
             "devices": jax.device_count(), "m": args.width, "m_pad": int(trained.P.shape[0]),
             "steps": int(network.step), "resumed_from": history["resumed_from"],
             "loss_first": float(history["loss"][0]) if len(history["loss"]) else None,
             "loss_last": float(history["loss"][-1]) if len(history["loss"]) else None,
             "seconds": seconds}
  if jax.process_index() == 0:
    if args.out:
      arrays = {}
      for path, leaf in jax.tree_util.tree_flatten_with_path(network)[0]:
        if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
          leaf = jax.random.key_data(leaf)
        arrays["state" + jax.tree_util.keystr(path)] = np.asarray(leaf)
      for k, v in history.items():
        if isinstance(v, np.ndarray):
          arrays["history." + k] = v
      pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      np.savez(args.out, **arrays)
    print("RESULT " + json.dumps(summary), flush=True)
  return summary


def launch(argv: Sequence[str], num_processes: int, *, script: str | os.PathLike | None = None,
           timeout: float = 600, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
  """Runs ``script`` (default: this file) as ``num_processes`` local processes on a free port.

  Each gets ``--coordinator localhost:PORT --num-processes N --process-id I`` plus
  ``argv``. When one process ends with an error (or is killed) the others are
  killed too: a process whose peer is gone would wait for it in a collective.
  Returns one ``CompletedProcess`` per process (``returncode``, ``stdout``,
  ``stderr``), in process order.
  """
  script = str(script or pathlib.Path(__file__).resolve())
  port = free_port()
  env = dict(os.environ if env is None else env)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.pop("XLA_FLAGS", None)   # one CPU device per process
  procs = [subprocess.Popen(
      [sys.executable, script, "--coordinator", f"localhost:{port}", "--num-processes",
       str(num_processes), "--process-id", str(i), *argv],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(num_processes)]
  outputs = [None] * num_processes
  deadline = time.monotonic() + timeout
  try:
    import threading  # pylint: disable=g-import-not-at-top
    threads = []
    for i, p in enumerate(procs):
      def read(i=i, p=p):
        outputs[i] = p.communicate()
      threads.append(threading.Thread(target=read, daemon=True))
      threads[-1].start()
    while any(p.poll() is None for p in procs):
      failed = any(p.poll() not in (None, 0) for p in procs)
      if failed or time.monotonic() > deadline:
        for p in procs:
          if p.poll() is None:
            p.send_signal(signal.SIGKILL)
      time.sleep(0.01)
    for t in threads:
      t.join()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [subprocess.CompletedProcess(p.args, p.returncode, *(outputs[i] or ("", "")))
          for i, p in enumerate(procs)]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  g = p.add_argument_group("processes")
  g.add_argument("--local", type=int, default=0, metavar="N",
                 help="start N processes on this machine (CPU, gloo) and wait for them")
  g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  g = p.add_argument_group("problem")
  g.add_argument("--n", type=int, default=48, help="training points")
  g.add_argument("--eval", type=int, default=8, help="held-out eval points (0: none)")
  g.add_argument("--dims", default="4,6", help="factor dims, comma-separated")
  g.add_argument("--width", type=int, default=61, help="neurons m (any: padded to the devices)")
  g.add_argument("--classes", type=int, default=3, help="1: regression (mse), else softmax")
  g.add_argument("--threshold", type=float, default=0.6)
  g.add_argument("--active-capacity", type=int, default=32)
  g.add_argument("--update", default="auto", choices=("auto", "sparse", "full"))
  g.add_argument("--gram", default="precomputed", choices=("precomputed", "factors"))
  g.add_argument("--optimizer", default="momentum", choices=("sgd", "momentum"))
  g.add_argument("--lr", type=float, default=0.3)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--x64", action="store_true", help="float64 (exact comparisons)")
  g = p.add_argument_group("training")
  g.add_argument("--batch-size", type=int, default=8)
  g.add_argument("--steps", type=int, default=20)
  g.add_argument("--eval-every", type=int, default=5)
  g.add_argument("--checkpoint-dir", default=None)
  g.add_argument("--checkpoint-every", type=int, default=0)
  g.add_argument("--keep", type=int, default=2)
  g.add_argument("--resume", action="store_true")
  g.add_argument("--out", default=None, help=".npz of the trained state and history (process 0)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(argv)
  if args.local:
    rest = []
    skip = False
    for a in argv:   # drop --local N
      if skip:
        skip = False
        continue
      if a == "--local":
        skip = True
        continue
      if not a.startswith("--local="):
        rest.append(a)
    results = launch(rest, args.local)
    for r in results:
      sys.stderr.write(r.stderr[-4000:] if r.returncode else "")
      sys.stdout.write("".join(l + "\n" for l in r.stdout.splitlines() if l.startswith("RESULT ")))
    return max(abs(r.returncode) for r in results)
  if args.coordinator is None or args.num_processes is None or args.process_id is None:
    raise SystemExit("pass --local N, or --coordinator HOST:PORT --num-processes N --process-id I")
  initialize(args.coordinator, args.num_processes, args.process_id)
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
