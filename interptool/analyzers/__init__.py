"""Analyzers: each reads an activation cache (attribution also needs the model) and returns a
result object with ``to_frame()``, ``to_dict()``, ``plot()`` and ``save(dir)``."""
