"""specdec: speculative decoding in JAX — drafters, tree builders and verifiers composed into one
on-device decode loop.

    import specdec
    model = specdec.load("smollm2-135m-instruct")
    spec = specdec.speculator(model, "ngram", "chain:4")
    print(specdec.chat(model, "Hello!", speculator=spec, max_new_tokens=64))

The contracts a new method implements: `Drafter` (`specdec.drafter`), `TreeBuilder`
(`specdec.builder`), `Verifier` (`specdec.verifiers.protocol`); `check_tree` and the loop's
`check=True` hold them to their invariants (`specdec.invariants`), `trace=` records every step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it; resolved on first use, so `import specdec.<module>` (the CLIs'
# `--help`, the checkpoint readers) does not load JAX through this facade.
_EXPORTS = {
    "TreeBuilder": "specdec.builder",
    "chat": "specdec.chat", "chat_ids": "specdec.chat", "raw_ids": "specdec.chat",
    "CompositionError": "specdec.compose", "make_spec": "specdec.compose",
    "Context": "specdec.context",
    "Drafter": "specdec.drafter",
    "GenerateOutput": "specdec.generate", "InvariantError": "specdec.generate",
    "PromptTooLongError": "specdec.generate", "generate": "specdec.generate", "warmup": "specdec.generate",
    "check_tree": "specdec.invariants",
    "SamplingConfig": "specdec.sampling",
    "Model": "specdec.speculator", "Speculator": "specdec.speculator", "load": "specdec.speculator",
    "speculator": "specdec.speculator",
    "Tree": "specdec.tree",
    "Verdict": "specdec.verifiers.protocol", "Verifier": "specdec.verifiers.protocol",
}  # fmt: skip
__all__ = [
    "CompositionError", "Context", "Drafter", "GenerateOutput", "InvariantError", "Model",
    "PromptTooLongError", "SamplingConfig", "Speculator", "Tree", "TreeBuilder", "Verdict", "Verifier",
    "chat", "chat_ids", "check_tree", "generate", "load", "make_spec", "raw_ids", "speculator", "warmup",
]  # fmt: skip


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specdec' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from specdec.builder import TreeBuilder
    from specdec.chat import chat, chat_ids, raw_ids
    from specdec.compose import CompositionError, make_spec
    from specdec.context import Context
    from specdec.drafter import Drafter
    from specdec.generate import GenerateOutput, InvariantError, PromptTooLongError, generate, warmup
    from specdec.invariants import check_tree
    from specdec.sampling import SamplingConfig
    from specdec.speculator import Model, Speculator, load, speculator
    from specdec.tree import Tree
    from specdec.verifiers.protocol import Verdict, Verifier
