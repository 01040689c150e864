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

from specdec.builder import TreeBuilder
from specdec.bundle import Model, Speculator, load, speculator
from specdec.chat import chat, chat_ids, raw_ids
from specdec.compose import CompositionError, make_spec
from specdec.context import Context
from specdec.drafter import Drafter
from specdec.generate import GenerateOutput, InvariantError, PromptTooLongError, generate, warmup
from specdec.invariants import check_tree
from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict, Verifier

__all__ = [
    "CompositionError", "Context", "Drafter", "GenerateOutput", "InvariantError", "Model",
    "PromptTooLongError", "SamplingConfig", "Speculator", "Tree", "TreeBuilder", "Verdict", "Verifier",
    "chat", "chat_ids", "check_tree", "generate", "load", "make_spec", "raw_ids", "speculator", "warmup",
]  # fmt: skip
