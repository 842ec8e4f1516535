"""kronjax.network: a trained network saved without optimizer state predicts identically anywhere."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import kronjax

INITS = ["explicit", "kronecker"]


def _trained(init, tmp_path=None):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 40, (4, 6), task="classification",
                                      num_classes=3, rank=2)
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=64, threshold=0.5, loss="softmax", num_classes=3, init=init,
                          train_output=True)
  state = kronjax.init(jax.random.PRNGKey(1), config, dataset, optax.sgd(0.5, momentum=0.9))
  state, _ = kronjax.fit(state, dataset, jax.random.PRNGKey(2), batch_size=8, steps=20,
                         progress=False)
  return state, dataset


@pytest.mark.slow
@pytest.mark.parametrize("init", INITS)
def test_saved_network_predicts_like_the_state_in_a_fresh_process(tmp_path, init):
  state, dataset = _trained(init)
  new = kronjax.data.synthetic(jax.random.PRNGKey(7), 9, (4, 6), rank=3)
  expected = np.asarray(kronjax.predict(state, dataset, new))
  path = kronjax.network.save(tmp_path / "net.npz", state, dataset)
  np.savez(tmp_path / "new.npz", *[np.asarray(f) for f in new.factors])
  np.save(tmp_path / "expected.npy", expected)
  script = textwrap.dedent(f"""
      import numpy as np, kronjax
      net = kronjax.network.load({str(path)!r})
      with np.load({str(tmp_path / "new.npz")!r}) as f:
        factors = tuple(f[k] for k in sorted(f.files))
      out = np.asarray(net.predict(kronjax.KronData(factors)))
      np.testing.assert_array_equal(out, np.load({str(tmp_path / "expected.npy")!r}))
      assert not hasattr(net, "opt_state")
      print("identical", out.shape)
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "identical (9, 3)" in proc.stdout


def test_file_holds_the_network_and_nothing_of_training(tmp_path):
  state, dataset = _trained("kronecker")
  path = kronjax.network.save(tmp_path / "net.npz", state, dataset)
  with np.load(path) as npz:
    names = set(npz.files)
    sizes = {k: npz[k].size for k in npz.files}
  m, n, C = 64, 40, 3
  assert names == {"__manifest__", "key", "A", "a", "b", "bias", "w0_scale", "factor_0", "factor_1"}
  assert sizes["A"] == m * n and sizes["a"] == m * C
  assert sizes["factor_0"] + sizes["factor_1"] == n * 2 * (4 + 6)  # n R sum_q d_q


def test_predict_refuses_bad_new_data():
  state, dataset = _trained("kronecker")
  net = kronjax.network.from_state(state, dataset)
  good = kronjax.data.synthetic(jax.random.PRNGKey(7), 3, (4, 6))
  np.testing.assert_array_equal(net.predict(good), kronjax.predict(state, dataset, good))
  with pytest.raises(ValueError, match=r"data has factor dims \(6, 4\)"):
    kronjax.predict(state, dataset, kronjax.data.synthetic(jax.random.PRNGKey(7), 3, (6, 4)))
  with pytest.raises(ValueError, match="data has 3 factors but the training data has 2"):
    net.predict(kronjax.data.synthetic(jax.random.PRNGKey(7), 3, (4, 6, 2)))
  with pytest.raises(TypeError, match="data must be a kronjax.KronData"):
    kronjax.predict(state, dataset, good.materialize())
  bad = np.asarray(good.factors[0]).copy()
  bad[1, 2] = np.inf
  with pytest.raises(ValueError, match=r"factors\[0\] contains 1 non-finite"):
    net.predict(kronjax.KronData((bad, good.factors[1])))
  with pytest.raises(ValueError, match="no points"):
    net.predict(kronjax.KronData((np.zeros((0, 4)), np.zeros((0, 6)))))


def test_load_refuses_other_files(tmp_path):
  (tmp_path / "x.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a readable kronjax network file"):
    kronjax.network.load(tmp_path / "x.npz")
  with pytest.raises(FileNotFoundError):
    kronjax.network.load(tmp_path / "missing.npz")


def test_network_file_of_an_earlier_kronjax_is_refused(tmp_path):
  """A network file of format v1 (written by kronjax 0.2) is refused, naming that version."""
  state, dataset = _trained("kronecker")
  path = kronjax.network.save(tmp_path / "net.npz", state, dataset)
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  manifest = json.loads(bytes(arrays["__manifest__"]).decode())
  assert manifest["version"] == 2
  manifest["version"] = 1
  arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  old = tmp_path / "old.npz"
  np.savez(old, **arrays)
  with pytest.raises(ValueError, match=r"written by kronjax 0\.2 \(network format v1\)"):
    kronjax.network.load(old)


def test_implicit_network_cannot_be_saved(tmp_path):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 20, (4, 6), task="regression")
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(1), kronjax.Config(width=32, init="implicit"), dataset,
                       optax.sgd(0.1))
  with pytest.raises(ValueError, match="init='kronecker'"):
    kronjax.network.save(tmp_path / "net.npz", state, dataset)
