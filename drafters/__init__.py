"""Drafters: one file per family; the protocol lives in `protocol.py`."""

from specdec.drafters.protocol import Context, Drafter

__all__ = ["Context", "Drafter"]
