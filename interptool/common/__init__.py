"""Helpers shared by several stages: JSON coercion (``jsonsafe``), statistics (``stats``)."""
