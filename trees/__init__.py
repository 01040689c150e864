"""Tree builders: static, dynamic and recursive-sampling trees; the protocol lives in `protocol.py`."""

from specdec.trees.protocol import TreeBuilder

__all__ = ["TreeBuilder"]
