"""Where a kronjax op runs: a native CPU kernel (``kronjax._src.kernels.native``) or its
plain ``jax.numpy`` expression. Written once here for every such op.

* The switch: the kernels are used unless ``KRONJAX_NATIVE=off`` (read by
  ``native.mode()``; it also stops the build) or the programmatic switch is off
  (``set_enabled``, ``using``, ``disabled``; for A/B benchmarks and tests).
  The switch is a JAX user context (``jax.make_user_context``), part of every
  jit cache key: a function traced under one setting is never reused under the
  other, and changing it clears no cache (both compilations stay cached).
* The platform: on CPU, the kernel when the switch is on, the operands are
  ones it takes and the library was prepared at import (``native.prepare``;
  tracing never builds it); otherwise the plain expression. On GPU and TPU the plain
  expression (``jax.lax.platform_dependent``: the choice is made per lowering).
* The wrapping (``op``): ``jax.custom_batching.custom_vmap`` with the op's own
  batching rule, inside ``jax.custom_jvp`` whose tangent is the plain
  expression's (custom_vmap has no transpose rule, so autodiff, forward and
  reverse, goes through the plain expression).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax

from kronjax._src.kernels import native

# Built and loaded here, at import, so that tracing never compiles C++ (native.prepare).
native.prepare()

# The programmatic switch, in the jit cache key: jitted functions retrace when it changes.
_switch = jax.make_user_context(default_value=True)


def enabled() -> bool:
  """Whether ops traced now may call the native kernels (the switch and ``KRONJAX_NATIVE``)."""
  return bool(_switch.value) and native.mode() != "off"


def set_enabled(flag: bool) -> bool:
  """Turns the native kernels on or off for ops traced from now on (process-wide);
  returns the previous setting. ``KRONJAX_NATIVE=off`` wins over ``True``."""
  previous = bool(_switch.get_global())
  _switch.set_global(bool(flag))
  return previous


def using(flag: bool) -> contextlib.AbstractContextManager[None]:
  """The switch set to ``flag`` inside the block (this thread): jitted functions called
  inside trace (or reuse their cached compilation) with this choice."""
  return _switch(bool(flag))


def disabled() -> contextlib.AbstractContextManager[None]:
  """XLA only inside the block: ``using(False)``."""
  return using(False)


def compile_with(fn: Callable[..., Any], *args: Any, use_native: bool) -> Any:
  """``fn.lower(*args).compile()`` for a jitted ``fn`` with the native kernels on
  or off: the compiled result keeps that choice (for A/B benchmarks in one process)."""
  with using(use_native):
    return fn.lower(*args).compile()


def native_ok(supported: bool) -> bool:
  """At trace time, in a CPU branch: whether to call a kernel for operands that
  it takes (``supported``). Builds nothing (``native.prepare`` ran at import)."""
  return enabled() and supported and native.available()


def by_platform(*args: Any, cpu: Callable[..., Any], default: Callable[..., Any]) -> Any:
  """``cpu(*args)`` when lowered for the CPU, ``default(*args)`` elsewhere.

  Pass a ``cpu`` made afresh for each trace when it reads the switch: JAX caches
  branch traces by function object.
  """
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


VmapRule = Callable[..., Any]


def op(plain: Callable[..., Any], kernel: Callable[..., Any], supports: Callable[..., bool],
       vmap_rule: VmapRule) -> Callable[..., Any]:
  """The op ``plain(*args)`` that runs ``kernel(*args)`` on CPU where it can.

  Args:
    plain: the expression (any leading dimensions that ``vmap_rule`` hands back
      to the op); also the op's derivative and its value on GPU/TPU.
    kernel: the native call, equal to ``plain`` up to rounding order.
    supports: ``supports(*args)``: whether ``kernel`` takes these operands.
    vmap_rule: ``vmap_rule(op, axis_size, in_batched, *args) -> out``, every
      output batched along axis 0; ``op`` is the undifferentiable op itself
      (to call again on stacked operands). It may use ``native_ok`` and
      ``by_platform`` for a choice of its own.

  Returns:
    ``fn(*args)``, differentiable in forward and reverse mode like ``plain``.
  """

  @jax.custom_batching.custom_vmap
  def batched(*args):
    def cpu(*args):  # made afresh per trace: it reads the switch
      return kernel(*args) if native_ok(supports(*args)) else plain(*args)
    return by_platform(*args, cpu=cpu, default=plain)

  @batched.def_vmap
  def _rule(axis_size, in_batched, *args):
    out = vmap_rule(batched, axis_size, in_batched, *args)
    return out, jax.tree.map(lambda _: True, out)

  @jax.custom_jvp
  def differentiable(*args):
    return batched(*args)

  @differentiable.defjvp
  def _jvp(primals, tangents):
    return differentiable(*primals), jax.jvp(plain, primals, tangents)[1]

  return differentiable
