"""Conformance registry: one module per method family, each with ``CASES``.

Every public method registers a :class:`tests.conftest.MethodCase` here and
is then run through every check of ``tests/test_conformance.py``.
"""
