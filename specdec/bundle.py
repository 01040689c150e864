"""A model on device and a speculator bundle: what `specdec.load`, `specdec.speculator` and
`specdec.chat` hand around.

    import specdec
    model = specdec.load("smollm2-135m-instruct")                 # or an HF folder, a .gguf file
    spec = specdec.speculator(model, "eagle", "dynamic:depth=2,topk=3,n=4")
    print(specdec.chat(model, "Write a haiku about the sea.", speculator=spec))
    out = specdec.generate(model.params, model.cfg, prompts, max_new_tokens=64, speculator=spec)

A `Speculator` is a drafter, its params, a tree builder and a verifier; `generate` validates the
composition (`specdec.compose`) before compiling. Strings follow the CLIs' grammar
(`specdec.drafters.parse_drafter`, `specdec.trees.parse_tree`, `specdec.verifiers.get_verifier`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from specdec.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Model:
    """A target ready to decode: device params, its config, its tokenizer and where it came from."""

    params: Any
    cfg: ModelConfig
    tokenizer: Any
    source: str


def load(spec: str | os.PathLike, *, dtype: str = "float32") -> Model:
    """Load a registry name, an HF checkpoint folder or a .gguf file onto the default device."""
    from specdec.loading import load_model
    from specdec.models import to_device

    m = load_model(spec, dtype=dtype)
    return Model(params=to_device(m.params, m.cfg), cfg=m.cfg, tokenizer=m.tokenizer, source=m.source)


@dataclasses.dataclass(frozen=True)
class Speculator:
    """A drafter with its params, a tree builder and a verifier (None: `auto`)."""

    drafter: Any
    params: Any
    builder: Any
    verifier: Any = None

    def kwargs(self) -> dict:
        """The `generate` / `warmup` keyword arguments this bundle stands for."""
        return dict(
            drafter=self.drafter, draft_params=self.params, builder=self.builder, verifier=self.verifier
        )


def speculator(model: Model, drafter, tree, verifier=None, *, draft_params=None) -> Speculator:
    """A bundle for `model`: `drafter` a CLI string ("ngram", "eagle", "layerskip:6", a checkpoint
    folder) or a drafter object with its `draft_params`; `tree` a tree spec ("chain:4") or a builder;
    `verifier` a name ("auto", "rrs", ...) or a verifier."""
    from specdec.trees import fit, parse_tree
    from specdec.verifiers import get_verifier

    builder = parse_tree(tree) if isinstance(tree, str) else tree
    if isinstance(drafter, str):
        from specdec.drafters import parse_drafter

        drafter, draft_params = parse_drafter(drafter, model.params, model.cfg, max_depth=builder.max_depth)
    builder = fit(builder, drafter)  # a fused drafter (eagle+ngram) fuses its retrieval paths
    if isinstance(verifier, str):
        verifier = get_verifier(verifier)
    return Speculator(drafter, draft_params, builder, verifier)
