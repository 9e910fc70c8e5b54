"""Test utilities shipped with the package so later features and users' own tests can use them."""
from .multiproc import DistributedTestError, free_port, run_distributed

__all__ = ["DistributedTestError", "free_port", "run_distributed"]
