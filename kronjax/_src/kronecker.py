"""Placeholder until the kronecker init lands."""

def kronecker_projections(*args, **kwargs):
  raise NotImplementedError("init='kronecker' is not available yet")
