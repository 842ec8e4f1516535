"""kronjax._src.kernels.native: the CPU kernels' build, modes and fallback, and the
kernels themselves at sizes that split over threads.

The ops' arithmetic is tested against their expressions in test_products.py and
test_rows.py and, inside training, in test_train.py and test_sweep.py. Here: the
environment switches, the build step (``make native``: ``native.main``), the
cache, what a process says when it has to build or cannot, and the row kernels'
multi-threaded split. The module keeps one load result per process (``native.prepare``,
run by ``import kronjax``), so the failure cases swap it for a fresh one and prepare
again (``monkeypatch`` puts the real one back); they use fake compilers (shell
scripts), so nothing here compiles the sources.
"""

import ctypes
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.kernels import products

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")])))


def _script(path: pathlib.Path, body: str) -> str:
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(0o755)
  return str(path)


def _real_library() -> pathlib.Path:
  """The library this process uses (built into the user cache once per machine).
  Skips without a C++ compiler; fails when there is one and the build failed."""
  if native.compiler() is None:
    pytest.skip(native.NO_COMPILER)
  assert native.available(warn=False), native.info()["reason"]
  return pathlib.Path(native.info()["library"])


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """A process state with nothing loaded yet and an empty cache directory."""
  monkeypatch.setattr(native, "_status", None)
  monkeypatch.setattr(native, "_warned", False)
  monkeypatch.setenv("KRONJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("KRONJAX_NATIVE", raising=False)
  return tmp_path


@pytest.fixture
def no_compiler(fresh, monkeypatch):
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setenv("PATH", str(fresh / "empty"))
  assert native.compiler() is None
  return fresh


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("", "auto"), ("OFF", "off"),
                                        ("0", "off"), ("require", "require"), ("1", "require")])
def test_mode_reads_the_environment(monkeypatch, value, want):
  monkeypatch.setenv("KRONJAX_NATIVE", value)
  assert native.mode() == want


def test_bad_mode_names_the_variable(monkeypatch):
  monkeypatch.setenv("KRONJAX_NATIVE", "fast")
  with pytest.raises(ValueError, match=r"KRONJAX_NATIVE must be one of .*'fast'"):
    native.mode()


def test_off_never_builds_and_does_not_warn(fresh, monkeypatch, recwarn):
  monkeypatch.setenv("KRONJAX_NATIVE", "off")
  assert not native.available() and not dispatch.enabled()
  assert native.info() == {"mode": "off", "available": False, "library": None,
                           "reason": "KRONJAX_NATIVE=off"}
  assert not (fresh / "cache").exists() and not recwarn.list


def test_nothing_is_built_for_a_gpu_backend(fresh, monkeypatch, recwarn, capsys):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert native.main([]) == 0
  assert "nothing is built" in capsys.readouterr().out
  assert not (fresh / "cache").exists()
  # Loaded at import (prepare initializes no backend), the kernels are still not used.
  monkeypatch.setattr(native, "_status", native.Status(True, None, "lib.so", failed=False))
  assert not native.available()
  assert "default backend is gpu" in native.info()["reason"]
  assert not recwarn.list


def test_unprepared_kernels_are_not_used_and_not_built(fresh, recwarn):
  assert not native.available()  # tracing never builds: only prepare (at import) does
  assert not (fresh / "cache").exists() and not recwarn.list


def test_no_compiler_warns_once_that_kronjax_runs_on_xla(no_compiler, recwarn):
  assert not native.prepare().available
  assert not native.available() and not native.available()
  assert [str(w.message) for w in recwarn.list if w.category is RuntimeWarning] == [
      f"kronjax: {native.NO_COMPILER}. KRONJAX_NATIVE=off silences this."]
  assert "apt-get install g++" in native.NO_COMPILER and "make native" in native.NO_COMPILER


def test_build_step_without_a_compiler_says_so_and_succeeds(no_compiler, capfd):
  assert native.main([]) == 0
  out, err = capfd.readouterr()
  assert out == native.NO_COMPILER + "\n" and err == ""


@pytest.mark.perf  # reads the lowered HLO text
def test_failed_build_warns_once_and_falls_back_to_xla(fresh, monkeypatch):
  monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
  native.prepare()
  with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*XLA.*KRONJAX_NATIVE=off"):
    assert not native.available()
  assert "no-such-compiler" in native.info()["reason"]
  assert native.main([]) == 1  # the build step fails loudly
  X, G, R = jnp.ones((3, 2)), jnp.ones((3, 4)), jnp.ones((4, 2))
  fn = jax.vmap(products.add_product, in_axes=(0, 0, None))
  hlo = jax.jit(fn).lower(X[None], G[None], R).as_text()  # no second warning here
  assert "kronjax_add_product" not in hlo
  assert float(jnp.max(jnp.abs(fn(X[None], G[None], R)[0] - (X + G @ R)))) == 0.0


def test_require_raises_when_the_build_fails(fresh, monkeypatch):
  monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
  monkeypatch.setenv("KRONJAX_NATIVE", "require")
  assert native.prepare().failed  # prepare never raises; available does
  with pytest.raises(RuntimeError, match="KRONJAX_NATIVE=require but the native kernels"):
    native.available()


def test_compiler_errors_are_reported(fresh, monkeypatch, capsys):
  fake = _script(fresh / "fake-cxx", "echo 'fake-cxx: broken on purpose' >&2\nexit 1\n")
  monkeypatch.setenv("CXX", fake)
  native.prepare()
  with pytest.warns(RuntimeWarning):
    native.available()
  assert "broken on purpose" in native.info()["reason"]
  assert list((fresh / "cache").iterdir()) == []  # no half-written library left behind
  assert native.main([]) == 1
  assert "broken on purpose" in capsys.readouterr().err


def test_a_first_use_that_builds_says_so_once(fresh, monkeypatch, capfd):
  """No silent stall: one line on stderr before the compiler runs (this fake one
  writes a file that is no library, so loading then fails and warns)."""
  fake = _script(fresh / "fake-cxx", 'for a; do out="$a"; done\necho junk > "$out"\n')
  monkeypatch.setenv("CXX", fake)
  assert native.prepare() is native.prepare()  # once per process
  with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
    assert not native.available() and not native.available()
  assert capfd.readouterr().err == native.BUILDING + "\n"
  assert "make native" in native.BUILDING


def test_build_is_cached_by_source_flags_and_compiler(fresh, monkeypatch):
  calls = fresh / "calls"
  fake = _script(fresh / "fake-cxx", f'echo run >> {calls}\nfor a; do out="$a"; done\n'
                                     'echo library > "$out"\n')
  first = native.build(fake)
  assert first.compiled and first.library.parent == fresh / "cache"
  assert first.library.name.startswith("kronjax_native_") and first.command[0] == fake
  assert "-Wall" in first.command and "-w" not in first.command
  again = native.build(fake)
  assert not again.compiled and again.library == first.library
  assert calls.read_text() == "run\n"  # the compiler ran once
  assert native.build(fake, rebuild=True).compiled and calls.read_text() == "run\nrun\n"
  assert native.library_path(fake + " ") != first.library
  monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DKRONJAX_TEST"))
  assert native.library_path(fake) != first.library


def test_build_step_prints_the_command_and_the_warnings(tmp_path):
  """``make native`` in a new process and an empty cache: the command (with
  -Wall) on stdout, the compiler's warnings on stderr, exit 0; a later process
  finds the build and says nothing. The fake compiler copies this machine's
  library, so the new process really loads and registers one."""
  library = _real_library()
  fake = _script(tmp_path / "fake-cxx", "echo 'rows.cc:1: warning: fake warning' >&2\n"
                 f'for a; do out="$a"; done\ncp {library} "$out"\n')
  env = dict(ENV, CXX=fake, KRONJAX_CACHE_DIR=str(tmp_path / "cache"))
  build = subprocess.run([sys.executable, "-m", "kronjax._src.kernels.native"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
  assert build.returncode == 0, build.stderr
  assert build.stdout.startswith(f"{fake} -O3 ") and " -Wall " in build.stdout
  assert "rows.cc:1: warning: fake warning" in build.stderr
  assert len(list((tmp_path / "cache").glob("kronjax_native_*.so"))) == 1
  use = subprocess.run([sys.executable, "-c", "import kronjax; from kronjax._src.kernels import "
                        "native; assert native.available()"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert use.returncode == 0 and native.BUILDING not in use.stderr, use.stderr


@pytest.mark.perf  # reads the lowered HLO text
def test_require_mode_trains_in_a_fresh_process(tmp_path):
  """A new process with an empty cache builds the kernel, and a float64 dense
  sweep step with it equals the XLA product's (the CI machine has g++: this is
  the check that the kernel really builds there)."""
  if native.compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  script = """
import jax, jax.numpy as jnp, optax
jax.config.update("jax_enable_x64", True)
import kronjax
from kronjax import sweep as sw
from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 40, (4, 6), task="regression")
dataset = kronjax.Dataset(data, labels)
config = kronjax.Config(width=64, threshold=0.6)
members = sw.grid(learning_rate=[0.5, 1.0], seed=[0, 1])
s = sw.init(config, dataset, members, tx=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            plan=kronjax.Plan(update="full"))
step = jax.jit(jax.vmap(kronjax.train_step, in_axes=(0, None, None)))
assert "kronjax_add_product" in step.lower(s, dataset, jnp.arange(8)).as_text()
state, _ = step(s, dataset, jnp.arange(8))
with dispatch.disabled():  # compiles under the other setting (its own jit cache entry)
  assert "kronjax_add_product" not in step.lower(s, dataset, jnp.arange(8)).as_text()
  ref, _ = step(s, dataset, jnp.arange(8))
err = float(jnp.max(jnp.abs(state.P - ref.P)) / jnp.max(jnp.abs(ref.P)))
print("RESULT", native.info()["available"], err)
"""
  env = dict(ENV, KRONJAX_NATIVE="require", KRONJAX_CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  _, available, err = lines[-1].split()
  assert available == "True" and float(err) < 1e-13
  assert len(list((tmp_path / "cache").glob("kronjax_native_*.so"))) == 1


# ----------------------------------------------------------------------------- threads

# rows.cc splits a kernel's rows over XLA's intra-op pool once a thread gets at
# least kGrainElements row elements; below it (every shape in test_rows.py) one
# thread runs it all. PJRT_NPROC sets the pool's size in a new process.
GRAIN_ELEMENTS = 1 << 15

THREADS_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from kronjax._src.kernels import native

assert native.available(), native.info()
print("THREADS", native.pool_threads())
n, m, S, C, K = {n}, {m}, {S}, 3, 96
idx = np.array({idx}, np.int32)
read = np.clip(np.where(idx < 0, idx + n, idx), 0, n - 1)
rng = np.random.default_rng(0)
f = lambda *shape: rng.normal(size=shape)
G = f(S, K, n)
ops = dict(X=f(S, n, m), U=f(S, len(idx), m), b=f(S) * 0.3, a=f(S, m, C), g=f(S, len(idx), C),
           P=f(S, K, m), G=G, Gs=np.where(rng.random(G.shape) < 0.03, G, 0.0), Gt=f(S, n, K),
           R=f(1, n, m), Y=f(S, K, m), coef=f(S, 3),
           Tr=np.stack([np.concatenate([rng.permutation(K)[:40], K + np.arange(2)])
                        for _ in range(S)]).astype(np.int32), Ur=f(S, 42, 3), R3=f(1, 3, m))

def relu_rows(X, b, a):
  Z, b = X[:, read], b[:, None, None]
  return jnp.einsum("sbm,smc->sbc", jax.nn.relu(Z - b), a), jnp.sum(Z > b, axis=-1) * 1.0

def traced(t, y, product, coef):  # the trace form's expression: (mu t + nu y + GR, y + c t')
  mu, nu, c = (coef[:, j, None, None] for j in range(3))
  t = mu * t + nu * y + product
  return t, y + c * t

def cases(X, U, b, a, g, P, G, Gs, Gt, R, Y, coef, Tr, Ur, R3):  # name: (kernel's, jnp's)
  i = jnp.asarray(idx)
  Gt_T = jnp.swapaxes(Gt, 1, 2)
  out = dict(add_product=(native.add_product(P, G, R), P + G @ R),
             add_product_sparse=(native.add_product(P, Gs, R), P + Gs @ R),
             add_product_t=(native.add_product(P, Gt, R, transpose_g=True), P + Gt_T @ R),
             trace_product=(native.trace_product(P, Y, G, R, coef), traced(P, Y, G @ R, coef)),
             trace_product_sparse=(native.trace_product(P, Y, Gs, R, coef[:1]),
                                   traced(P, Y, Gs @ R, jnp.broadcast_to(coef[:1], coef.shape))),
             trace_product_t=(native.trace_product(P, Y, Gt, R, coef, transpose_g=True),
                              traced(P, Y, Gt_T @ R, coef)),
             add_rows_product=(native.add_rows_product(P, Tr, Ur, R3),
                               jax.vmap(lambda p, t, u: p.at[t].add(u @ R3[0], mode="drop"))(
                                   P, Tr, Ur)))
  for s in (S, 1):  # two members, one member
    x, u, b_, a_, g_ = X[:s], U[:s], b[:s], a[:s], g[:s]
    out[f"take_rows {{s}}"] = native.take_rows(x, i), x[:, read]
    out[f"take_cols {{s}}"] = native.take_cols(jnp.swapaxes(x, 1, 2), i), x[:, read]
    out[f"add_rows {{s}}"] = native.add_rows(x, i, u), jax.vmap(lambda x, u: x.at[idx].add(u))(x, u)
    for c in (1, C):
      out[f"relu_rows C={{c}} {{s}}"] = (tuple(native.relu_rows(x, i, b_, a_[..., :c])),
                                     relu_rows(x, b_, a_[..., :c]))
      out[f"relu_rows_grad C={{c}} {{s}}"] = (
          native.relu_rows_grad(x, i, b_, a_[..., :c], g_[..., :c]),
          jnp.where(x[:, read] > b_[:, None, None], g_[..., :c] @ jnp.swapaxes(a_[..., :c], 1, 2), 0.0))
  return {{name: jnp.max(jnp.stack([jnp.max(jnp.abs(u - v))
                                   for u, v in zip(*map(jax.tree.leaves, pair))]))
          for name, pair in out.items()}}

for name, err in jax.jit(cases)(**ops).items():
  print("ERR", name.replace(" ", "_"), float(err))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_every_kernel_at_sizes_that_split_over_threads(tmp_path, threads):
  """float64, every kernel against its jnp expression, with the rows split over
  ``threads`` threads; one member (take/relu rows split by row, add_rows by column
  block) and two. Indices negative, repeated and out of range."""
  library = _real_library()
  n, m, S = 40, 1037, 2   # m: a vectorized body and a remainder
  idx = [3, -1, 0, 3, 45, -45, 39] * 10
  B = len(idx)
  # ParallelFor's task count, units // grain (then capped by the threads), for
  # rows.cc's units: take / relu rows split the members' batch rows; add_rows
  # splits one member into 256-column blocks, and several by member.
  tasks = {"rows, 1 member": B // (GRAIN_ELEMENTS // m),
           "rows, 2 members": S * B // (GRAIN_ELEMENTS // m),
           "add_rows, 1 member": -(-m // 256) // max(1, GRAIN_ELEMENTS // (B * 256)),
           "add_rows, 2 members": S // max(1, GRAIN_ELEMENTS // (B * m))}
  assert min(tasks.values()) >= 2, tasks
  env = dict(ENV, PJRT_NPROC=str(threads), KRONJAX_CACHE_DIR=str(library.parent),
             KRONJAX_NATIVE="require")
  proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT.format(n=n, m=m, S=S, idx=idx)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  assert f"THREADS {threads}" in lines
  errors = {l.split()[1]: float(l.split()[2]) for l in lines if l.startswith("ERR ")}
  assert len(errors) == 7 + 2 * 7
  assert max(errors.values()) < 1e-12, errors


# ----------------------------------------------------------------------------- add_product's split

# add_product.cc cuts X along its longer side into blocks of 16 lines, taken one
# at a time by XLA's threads, each a single-threaded gemm (BLAS set to one thread
# while the kernel runs), or the zero-skipping loop on a mostly-zero G.

def _add_product_cases(rng, dtype):
  """(X, G, R, transpose_g) at shapes that split over threads: X taller than wide
  and wider than tall, one and three members, R broadcast, G dense and mostly zero."""
  for S, r, c, k, RS in ((1, 1030, 77, 40, 1), (3, 66, 1037, 32, 3), (2, 300, 400, 24, 1)):
    X = rng.normal(size=(S, r, c)).astype(dtype)
    G = rng.normal(size=(S, r, k)).astype(dtype)
    R = rng.normal(size=(RS, k, c)).astype(dtype)
    sparse = np.where(rng.random(G.shape) < 0.04, G, 0.0).astype(dtype)
    for g in (G, sparse):
      yield X, g, R, False
      yield X, np.ascontiguousarray(np.swapaxes(g, 1, 2)), R, True


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_add_product_split_is_exact_float64(x64, threads):
  _real_library()
  rng = np.random.default_rng(3)
  with native.max_threads(threads):
    for X, G, R, transposed in _add_product_cases(rng, np.float64):
      got = jax.jit(lambda X, G, R, t=transposed: native.add_product(X, G, R, transpose_g=t))(X, G, R)
      want = X + (np.swapaxes(G, 1, 2) if transposed else G) @ R
      assert got.dtype == jnp.float64
      assert np.max(np.abs(np.asarray(got) - want)) < 1e-9, (X.shape, G.shape, transposed)


def test_add_product_leaves_the_blas_thread_count_as_it_was():
  """The kernel sets BLAS to one thread only while it runs."""
  _real_library()
  assert native.blas_split()  # scipy's OpenBLAS has the thread-count functions
  from scipy.linalg import cython_blas
  wrapper = ctypes.CDLL(cython_blas.__file__)
  get = wrapper.scipy_openblas_get_num_threads
  before = get()
  X = jnp.ones((512, 640), jnp.float32)
  jax.block_until_ready(jax.jit(native.add_product)(X, jnp.ones((512, 32)), jnp.ones((32, 640))))
  assert get() == before


def test_blas_split_switch_is_exact_both_ways_and_refuses_non_bools(x64):
  """With the kernel's own split off each member's gemm is one BLAS call (on BLAS's
  threads); the result is the same sum either way."""
  _real_library()
  rng = np.random.default_rng(4)
  X, G, R = rng.normal(size=(2, 300, 400)), rng.normal(size=(2, 300, 24)), rng.normal(size=(1, 24, 400))
  want = X + G @ R
  for split in (False, True):
    previous = native.set_blas_split(split)
    try:
      assert native.blas_split() == split
      got = jax.jit(native.add_product)(X, G, R)
      assert np.max(np.abs(np.asarray(got) - want)) < 1e-9
    finally:
      native.set_blas_split(previous)
  assert native.blas_split()
  for bad in (1, "yes", None):
    with pytest.raises(TypeError, match=r"flag must be a bool"):
      native.set_blas_split(bad)


def test_max_threads_rejects_bad_values_and_restores():
  _real_library()
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(ValueError, match=r"threads must be an int >= 0"):
      native.set_max_threads(bad)
  previous = native.set_max_threads(0)
  with native.max_threads(1):
    assert native.set_max_threads(1) == 1
  assert native.set_max_threads(previous) == 0


NO_BLAS_THREADS_SCRIPT = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from scipy.linalg import cython_blas
from kronjax._src.kernels import native
# The BLAS without thread-count functions: each member's gemm is one BLAS call.
handle = native._library()
handle.kronjax_set_blas(native._capsule_pointer(cython_blas.__pyx_capi__["sgemm"]),
                        native._capsule_pointer(cython_blas.__pyx_capi__["dgemm"]), None, None)
assert not native.blas_split()
rng = np.random.default_rng(0)
X, G, R = rng.normal(size=(2, 300, 400)), rng.normal(size=(2, 300, 24)), rng.normal(size=(1, 24, 400))
print("ERR", float(np.max(np.abs(np.asarray(jax.jit(native.add_product)(X, G, R)) - (X + G @ R)))))
"""


def test_add_product_without_blas_thread_control_is_exact():
  library = _real_library()
  env = dict(ENV, KRONJAX_CACHE_DIR=str(library.parent), KRONJAX_NATIVE="require")
  proc = subprocess.run([sys.executable, "-c", NO_BLAS_THREADS_SCRIPT], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert float(proc.stdout.split("ERR")[1]) < 1e-9
