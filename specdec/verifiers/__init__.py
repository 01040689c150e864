"""Verifiers: one file each; the protocol and `Verdict` live in `protocol.py`."""

from specdec.verifiers.protocol import Verdict, Verifier

__all__ = ["Verdict", "Verifier"]
