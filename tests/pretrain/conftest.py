"""Fixtures shared by the pretrain tests: the eval suite's tiny export (trained once per session)."""

from tests.eval.conftest import tiny_export  # noqa: F401  (a fixture, registered by being imported here)
