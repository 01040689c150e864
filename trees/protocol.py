"""The tree-builder protocol (`specdec.builder`, re-exported here)."""

from specdec.builder import TreeBuilder

__all__ = ["TreeBuilder"]
