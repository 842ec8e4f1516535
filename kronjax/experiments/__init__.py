"""The experiment layer: TOML-configured runs, the ``kronjax`` CLI, timing and inspection helpers.

Built on kronjax's public API only; the library never imports it.
"""
