"""A trained network for inference: what ``predict`` needs, nothing of training.

Shapes: m neurons, n training points, C outputs, R rank of the training data,
p factors with dims d_q, n' new points.

The trained network is ``f(x) = a^T relu(W x - b) / sqrt(m) + c`` with
``W = s W0 + A X``: the weights never leave the span of the training data and
``W0``. So applying it to a new point needs

* the init's recipe for ``W0 x'`` (the key, the init kind and rank: ``W0`` is
  regenerated, never stored),
* ``A`` ``(m, n)``, ``a`` ``(m, C)``, ``b``, the output bias ``c`` ``(C,)`` and the
  scale ``s`` of ``W0`` (1 unless weight decay shrank it),
* the training factors ``X`` (``n`` points, for ``K(X, x')``).

``save`` writes exactly that as one ``.npz`` (atomically), and ``load`` reads it
back in any process: ``network.predict(data)`` equals ``kronjax.predict(state,
dataset, data)`` bit for bit. The file holds ``m n + m C + 1`` floats of ``A``,
``a`` and ``b``, ``n R sum_q d_q`` floats of training factors, the key and a
JSON manifest (the ``Config``, and whether the training points were
normalized): ``4 (m n + m C + n R sum_q d_q)`` bytes in float32, plus under a
kilobyte. No optimizer state, no ``P``, no Gram, no ``d``-sized array.

New points are prepared as the training points were: a network trained on a
``Dataset(..., normalize=True)`` normalizes them (per point; per entity row for
indexed data), one trained on raw points takes them as they are and warns
(``NormWarning``) when they are not unit-norm. A network trained with a loss of
one's own records the function's name; ``predict`` does not need it, and
``load(path, loss=fn)`` gives it back (for ``Config.loss``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import serialization
from kronjax._src.base import checks
from kronjax._src.model import initializers
from kronjax._src.model import losses
from kronjax._src.model.config import LOSSES, Config
from kronjax._src.data.dataset import Dataset, warn_unless_unit_norm
from kronjax._src.data.kron_data import KronData
from kronjax._src.step.state import TrainState

FORMAT = "kronjax-network"
VERSION = 2
WRITTEN_BY = {1: "0.2"}  # the kronjax release that wrote each older format


@dataclasses.dataclass(frozen=True)
class Network:
  """A trained two-layer network, applicable to any input in its tensor space.

  Attributes:
    config: the (resolved) ``Config`` it was trained with (width, init, ...).
    key: the state's key (``W0`` and the initial ``a`` derive from it).
    A: ``(m, n)`` coefficients, ``W = s W0 + A X``.
    a: ``(m, C)`` output layer.  b: ``()`` threshold.
    data: the ``n`` training points ``X`` (``KronData``).
    bias: ``(C,)`` output bias.  w0_scale: ``()`` the scale ``s`` of ``W0``.
    normalize: whether the training points were normalized
      (``Dataset(..., normalize=True)``): new points are then normalized the
      same way before ``predict`` (static).

  A pytree: the arrays and ``data`` are leaves, ``config`` is static, so a
  network passes through ``jax.jit`` (``jax.jit(lambda net, x: net.predict(x))``)
  and ``jax.tree.map``.
  """

  config: Config = dataclasses.field(metadata=dict(static=True))
  key: jax.Array
  A: jax.Array
  a: jax.Array
  b: jax.Array
  data: KronData
  bias: jax.Array
  w0_scale: jax.Array
  normalize: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def projections(self, data: KronData) -> jax.Array:
    """``W X'^T`` ``(m, n')`` for new points as given (not normalized): ``W0 X'^T + A K(X,
    X')``, no ``O(d)`` work for ``init="kronecker"``."""
    return new_projections(self.config, self.key, self.A, self.data, data, self.w0_scale)

  def hidden(self, data: KronData) -> jax.Array:
    """The hidden features ``relu(W x' - b)`` ``(n', m)`` of the points ``data`` (prepared
    as ``predict`` prepares them): the input of a head of one's own (any pytree model)."""
    data = prepare_new_data("data", self.data, data, self.normalize)
    return losses.hidden(self.projections(data), self.b).T

  def predict(self, data: KronData) -> jax.Array:
    """Network outputs ``(n', C)`` on ``data`` (checked as ``kronjax.predict`` checks it,
    and normalized first when the training points were: ``normalize``)."""
    data = prepare_new_data("data", self.data, data, self.normalize)
    return outputs(self.config, self.a, self.b, self.bias, self.projections(data))


jax.tree_util.register_dataclass(
    Network,
    data_fields=[f.name for f in dataclasses.fields(Network) if not f.metadata.get("static")],
    meta_fields=[f.name for f in dataclasses.fields(Network) if f.metadata.get("static")],
)


def check_single_state(state: Any) -> None:
  """TypeError unless ``state`` is one ``TrainState`` (not a stacked sweep state)."""
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  if np.ndim(state.step) != 0:
    raise TypeError("this is a sweep state: use kronjax.sweep.member(state, i) or jax.vmap "
                    f"(its step has shape {np.shape(state.step)}, one entry per member).")


def outputs(config: Config, a: jax.Array, b: jax.Array, bias: jax.Array,
            P: jax.Array) -> jax.Array:
  """Network outputs ``(n', C)`` from projections ``P (m, n')``."""
  return losses.hidden(P, b).T @ a / math.sqrt(config.width) + bias[None, :]


def check_new_data(name: str, train: KronData, data: Any) -> KronData:
  """``data`` lives in the training data's tensor space, holds points and only finite values."""
  if not isinstance(data, KronData):
    raise TypeError(f"{name} must be a kronjax.KronData, got {type(data).__name__}; wrap the "
                    "factors of the new points with kronjax.KronData((u, v, ...)).")
  if data.num_factors != train.num_factors:
    raise ValueError(f"{name} has {data.num_factors} factors but the training data has "
                     f"{train.num_factors}; new points must live in the same tensor space.")
  if data.dims != train.dims:
    raise ValueError(f"{name} has factor dims {data.dims} but the training data has {train.dims}; "
                     "new points must live in the same tensor space.")
  for q, f in enumerate(data.factors):
    checks.check_finite(f"{name}.factors[{q}]", f)
  return data


def prepare_new_data(name: str, train: KronData, data: Any, normalize: bool) -> KronData:
  """``data`` checked (``check_new_data``) and prepared as the training points were:
  normalized when ``normalize``; else a ``NormWarning`` when concrete points are not
  unit-norm (the threshold and capacities assume ``||x|| = 1``)."""
  data = check_new_data(name, train, data)
  if normalize:
    return data.normalize()
  warn_unless_unit_norm(name, data, stacklevel=4)
  return data


def new_projections(config: Config, key: jax.Array, A: jax.Array, train: KronData,
                    data: KronData, w0_scale: Any = 1.0) -> jax.Array:
  """``(s W0 + A X) X'^T`` ``(m, n')``; ``W0 X'^T`` from the init's recipe."""
  if config.init == "implicit":
    raise ValueError(
        "the points are not the dataset's training or eval points, and this network was "
        "initialized with init='implicit': W0 was never drawn, only its projections onto the "
        "dataset's points, so the network is undefined elsewhere. Use init='kronecker' (d-free, "
        "predicts anywhere), or put the points in the dataset's eval split before kronjax.init.")
  key_w = initializers.init_keys(key)["W0"]
  dtype = A.dtype
  data = data.astype(dtype)
  (P0,) = initializers.new_point_projections(key_w, config, data)
  return (w0_scale * P0).astype(dtype) + A @ train.gram(other=data)


def from_state(state: TrainState, dataset: Dataset) -> Network:
  """The trained network of ``state`` (an unsharded, single state) for ``dataset``."""
  check_single_state(state)
  state.check_dataset(dataset)
  if state.P.shape[0] != state.config.width:
    raise ValueError("state is a padded neuron-sharded state; call "
                     "kronjax.sharding.unshard_state(state) first.")
  return Network(config=state.config, key=state.key, A=state.A, a=state.a, b=state.b,
                 data=dataset.data, bias=state.bias, w0_scale=state.w0_scale,
                 normalize=dataset.normalized)


def save(path: str | os.PathLike, state: TrainState, dataset: Dataset) -> pathlib.Path:
  """Saves the trained network of ``state`` (no optimizer state) as one ``.npz`` file.

  See the module docstring for what the file holds and its size. Written
  atomically (``path`` is either the old file or the new one). Returns the path.
  """
  network = from_state(state, dataset)
  if network.config.init == "implicit":
    raise ValueError("a network trained from init='implicit' cannot be saved for inference: it is "
                     "undefined outside the dataset's points (W0 was never drawn). Use "
                     "init='kronecker'.")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays: dict[str, np.ndarray] = {}
  leaves = {"key": serialization.put_array(arrays, "key", network.key),
            "A": serialization.put_array(arrays, "A", network.A),
            "a": serialization.put_array(arrays, "a", network.a),
            "b": serialization.put_array(arrays, "b", network.b),
            "bias": serialization.put_array(arrays, "bias", network.bias),
            "w0_scale": serialization.put_array(arrays, "w0_scale", network.w0_scale)}
  factors = [serialization.put_array(arrays, f"factor_{q}", f)
             for q, f in enumerate(network.data.factors)]
  if network.data.is_indexed:   # pairs of entities: the tables and the (n, p) index
    leaves["index"] = serialization.put_array(arrays, "index", network.data.index)
  config = {f.name: getattr(network.config, f.name) for f in dataclasses.fields(Config)}
  config["loss"] = loss_name(network.config.loss)
  manifest = {"format": FORMAT, "version": VERSION, "config": config, "leaves": leaves,
              "factors": factors, "normalize": network.normalize}
  arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  serialization.write_npz_atomically(path, arrays)
  return path


def load(path: str | os.PathLike, *, loss: Any = None) -> Network:
  """Reads a network written by ``save``; raises ValueError for another or a damaged file.

  Args:
    path: the ``.npz`` file.
    loss: for a network trained with a loss of one's own (``Config(loss=fn)``),
      that function (the file holds only its name): it becomes ``config.loss``.
      Without it such a network still predicts; its ``config.loss`` is a
      ``MissingLoss`` that raises when called and names this argument.

  Raises:
    ValueError: another or a damaged file; ``loss`` given for a network trained
      with a named loss, or a function of another name than the saved one.
    TypeError: ``loss`` not callable.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no network file at {str(path)!r}.")
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
      manifest = json.loads(bytes(npz["__manifest__"]).decode())
      if manifest.get("format") == FORMAT and manifest.get("version") in WRITTEN_BY:
        raise ValueError(f"written by kronjax {WRITTEN_BY[manifest['version']]} (network format "
                         f"v{manifest['version']}); this kronjax reads v{VERSION}: save the "
                         "network again with this kronjax, or load it with the one that wrote it")
      if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} v{VERSION} file")
      leaves = {k: jnp.asarray(serialization.get_array(npz, {**e, "name": k}))
                for k, e in manifest["leaves"].items()}
      factors = tuple(jnp.asarray(serialization.get_array(npz, {**e, "name": f"factor_{q}"}))
                      for q, e in enumerate(manifest["factors"]))
      config_values = dict(manifest["config"])
      saved_loss = config_values.pop("loss")
      normalize = manifest.get("normalize", False)   # absent from older v2 files
      if not isinstance(normalize, bool):
        raise ValueError(f"the manifest's normalize is {normalize!r}, not a bool")
  except (zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError, OSError,
          UnicodeDecodeError) as e:
    raise ValueError(f"{str(path)!r} is not a readable kronjax network file "
                     f"({type(e).__name__}: {e}).") from e
  config = Config(**config_values, loss=_loss_for(saved_loss, loss, path))
  return Network(config=config, key=leaves["key"], A=leaves["A"], a=leaves["a"], b=leaves["b"],
                 data=KronData(factors, index=leaves.get("index")), bias=leaves["bias"],
                 w0_scale=leaves["w0_scale"], normalize=normalize)


@dataclasses.dataclass(frozen=True)
class MissingLoss:
  """Stands for a loss of one's own that a loaded network knows only by name.

  ``predict`` never calls the loss; calling this raises ValueError naming
  ``kronjax.network.load(path, loss=...)``.
  """

  name: str

  def __call__(self, outputs: Any, labels: Any) -> Any:
    raise ValueError(
        f"this network was trained with the loss {self.name!r}, which a network file records "
        "by name only; predict does not need it, but evaluating does: load the network with "
        "kronjax.network.load(path, loss=<that function>).")


def loss_name(loss: Any) -> str:
  """The loss as the manifest records it: a name, or a function's ``module.qualname``."""
  return loss.name if isinstance(loss, MissingLoss) else losses.loss_name(loss)


def _loss_for(saved: str, given: Any, path: pathlib.Path) -> Any:
  """``Config.loss`` of a loaded network: the saved name, ``given``, or a ``MissingLoss``."""
  if saved in LOSSES:
    if given is not None:
      raise ValueError(f"{str(path)!r} was trained with loss={saved!r}; loss= is only for a "
                       "network trained with a loss of one's own. Leave it out.")
    return saved
  if given is None:
    return MissingLoss(saved)
  if not callable(given):
    raise TypeError(f"loss must be the function the network was trained with ({saved!r}), got "
                    f"{type(given).__name__}.")
  if losses.loss_name(given) != saved:
    raise ValueError(f"loss is {losses.loss_name(given)!r}, but {str(path)!r} was trained with "
                     f"{saved!r}; pass that function.")
  return given
