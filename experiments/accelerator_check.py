"""The accelerator check (`make accelerator-check`): tests and small benchmarks on a GPU or TPU.

On a machine where JAX's default backend is a GPU or TPU it runs, each under a
time limit, in under 8 minutes together:

1. the accelerator-relevant tests: ``pytest -m "not slow"`` on test_train,
   test_sweep, test_threshold and test_network;
2. ``experiments/bench_step.py --smoke`` and ``experiments/bench_sweep.py --smoke``;
3. a bounded step-and-predict benchmark (``--bench-predict``, below): the train
   step and ``kronjax.predict`` on unseen points, kronecker init, ``d = 2**20``;
4. ``experiments/hlo_costs.py``: the kernels and bytes of the step as compiled for
   the accelerator (the performance page's table shows the CPU compilation);

and writes JSON under ``experiments/results/accelerator/``: one file per
benchmark and ``summary.json`` (environment, date, command, each part's exit
status, time and last output lines). It exits 1 if any part failed or ran out
of time.

Where JAX sees only a CPU it prints one line saying there is no accelerator and
exits 0, in about the time it takes to import JAX.

    python experiments/accelerator_check.py [--out DIR] [--budget-s 480] [--dry-run]
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "accelerator"
TEST_FILES = ("tests/test_train.py", "tests/test_sweep.py", "tests/test_threshold.py",
              "tests/test_network.py")
BUDGET_S = 480


def plan(out: pathlib.Path, python: str = sys.executable) -> list[dict]:
  """The parts of the check: ``name``, ``cmd`` (argv, run in the repository root), ``limit_s``."""
  return [
      {"name": "tests", "limit_s": 240,
       "cmd": [python, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
               *TEST_FILES]},
      {"name": "bench_step", "limit_s": 60,
       "cmd": [python, "experiments/bench_step.py", "--smoke", "--out", str(out / "step.json")]},
      {"name": "bench_sweep", "limit_s": 75,
       "cmd": [python, "experiments/bench_sweep.py", "--smoke", "--out", str(out / "sweep.json")]},
      {"name": "bench_predict", "limit_s": 60,
       "cmd": [python, "experiments/accelerator_check.py", "--bench-predict", str(out / "predict.json")]},
      {"name": "hlo_costs", "limit_s": 45,
       "cmd": [python, "experiments/hlo_costs.py", "--out", str(out / "hlo_costs.json")]},
  ]


def bench_predict(path: pathlib.Path, *, width: int = 8192, n: int = 1024, n_new: int = 1024,
                  dims: tuple[int, int] = (1024, 1024), batch: int = 32, repeats: int = 10) -> dict:
  """Median times of the train step and of ``predict`` on ``n_new`` unseen points; writes JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import kronjax  # pylint: disable=g-import-not-at-top
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top

  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, n + n_new, dims, task="regression")
  train = data.subset(jax.numpy.arange(n))
  new = data.subset(jax.numpy.arange(n, n + n_new))
  dataset = kronjax.Dataset(train, labels[:n])
  config = kronjax.Config(width=width, init="kronecker")
  start = time.perf_counter()
  state = jax.block_until_ready(kronjax.init(key, config, dataset, optax.sgd(8.0)))
  init_s = time.perf_counter() - start
  batches = [jax.numpy.asarray(b) for b in kronjax.batch_schedule(key, n, batch, 3 + repeats)]
  step_t, state = timing.time_steps(lambda s, b: kronjax.jit_train_step(s, dataset, b), state,
                                    batches, warmup=3)
  predict = jax.jit(kronjax.predict)
  predict_t = timing.time_fn(predict, state, dataset, new, warmup=1, repeats=repeats)
  result = {
      "benchmark": "accelerator predict", **timing.provenance(),
      "settings": {"width": width, "n": n, "n_new": n_new, "dims": list(dims), "batch": batch,
                   "init": state.config.init, "init_rank": state.config.init_rank,
                   "update": state.update_path(batch), "repeats": repeats},
      "init_s_with_compile": init_s, "step": step_t, "predict": predict_t,
  }
  timing.write_json(path, result)
  return result


def _run(part: dict, limit_s: float) -> dict:
  start = time.perf_counter()
  try:
    proc = subprocess.run(part["cmd"], cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    rc, output = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    rc = "timeout"
    output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
  tail = [line for line in output.splitlines() if line.strip()][-15:]
  return {"name": part["name"], "command": " ".join(part["cmd"][1:]), "limit_s": limit_s,
          "seconds": round(time.perf_counter() - start, 2), "returncode": rc, "output_tail": tail}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON results")
  parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time limit of the whole check")
  parser.add_argument("--dry-run", action="store_true", help="print the parts, run nothing")
  parser.add_argument("--bench-predict", metavar="JSON", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.bench_predict:
    bench_predict(pathlib.Path(args.bench_predict))
    return 0

  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  if backend == "cpu" and not args.dry_run:
    print(f"accelerator check: no accelerator (JAX's default backend is cpu, devices "
          f"{[str(d) for d in jax.devices()]}); nothing to run. On a GPU or TPU machine, install "
          "its JAX build (e.g. pip install -U \"jax[cuda12]\") and run make accelerator-check there.")
    return 0

  out = pathlib.Path(args.out)
  parts = plan(out)
  if args.dry_run:
    for part in parts:
      print(f"{part['name']} (limit {part['limit_s']} s): {' '.join(part['cmd'][1:])}")
    return 0

  out.mkdir(parents=True, exist_ok=True)
  print(f"accelerator check on {backend} ({jax.devices()[0].device_kind}); results in {out}", flush=True)
  deadline = time.perf_counter() + args.budget_s
  results = []
  for part in parts:
    left = deadline - time.perf_counter()
    if left < 10:
      results.append({"name": part["name"], "returncode": "skipped: budget spent"})
      print(f"  {part['name']}: skipped, the {args.budget_s:.0f} s budget is spent", flush=True)
      continue
    result = _run(part, min(part["limit_s"], left))
    results.append(result)
    last = result["output_tail"][-1] if result["output_tail"] else ""
    print(f"  {part['name']}: {'ok' if result['returncode'] == 0 else 'FAILED (' + str(result['returncode']) + ')'}"
          f" in {result['seconds']} s; {last}", flush=True)

  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  summary = {**timing.provenance(), "budget_s": args.budget_s, "parts": results}
  timing.write_json(out / "summary.json", summary)
  failed = [r["name"] for r in results if r["returncode"] != 0]
  print(f"accelerator check: {'failed: ' + ', '.join(failed) if failed else 'all parts passed'}; "
        f"{out / 'summary.json'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
