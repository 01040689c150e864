"""Method configurations: a drafter, a tree builder and a verifier, written `drafter|tree|verifier`.

    ngram|chain:4|auto
    layerskip:6|dynamic:depth=3,topk=2,n=8|auto
    ngram                       (tree defaults to chain:4, verifier to auto)
    none                        (autoregressive: the baseline's own loop, a sanity row with speedup ~1)

`Method.parse` reads the string; `Method.build` turns it into the engine objects (checking every
part, so a typo fails before any decoding). The baseline is always `Method(None)`: the same decode
loop with no drafter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

DEFAULT_TREE = "chain:4"
DEFAULT_VERIFIER = "auto"
AR_NAMES = ("none", "ar", "baseline")


@dataclasses.dataclass(frozen=True)
class Method:
    """One configuration to evaluate. `drafter=None` is autoregressive decoding.

    `verifier` is a registry name (`specdec.verifiers.VERIFIERS`) or a verifier object with the
    protocol signature (Python API only; e.g. a custom or deliberately broken verifier in tests).
    `name` overrides the label.
    """

    drafter: str | None
    tree: str = DEFAULT_TREE
    verifier: Any = DEFAULT_VERIFIER
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> Method:
        """`drafter[|tree[|verifier]]`; raises ValueError on an empty part or too many parts."""
        parts = [p.strip() for p in text.split("|")]
        if not 1 <= len(parts) <= 3 or any(not p for p in parts):
            raise ValueError(
                f"method {text!r}: expected 'drafter|tree|verifier' (tree and verifier optional), "
                "e.g. 'ngram|chain:4|auto' or 'layerskip:6|dynamic:depth=3,topk=2,n=8|auto'"
            )
        if parts[0].lower() in AR_NAMES:
            if len(parts) > 1:
                raise ValueError(f"method {text!r}: autoregressive decoding takes no tree or verifier")
            return cls(None)
        parts += [DEFAULT_TREE, DEFAULT_VERIFIER][len(parts) - 1 :]
        return cls(parts[0], parts[1], parts[2])

    @property
    def verifier_name(self) -> str:
        v = self.verifier
        return v if isinstance(v, str) else getattr(v, "__name__", type(v).__name__)

    @property
    def label(self) -> str:
        """`drafter|tree|verifier`, or `ar` for autoregressive decoding (unless `name` is set)."""
        if self.name:
            return self.name
        if self.drafter is None:
            return "ar"
        return f"{self.drafter}|{self.tree}|{self.verifier_name}"

    @property
    def lossless(self) -> bool | None:
        """Whether the verifier is documented lossless (None: unknown custom verifier)."""
        if self.drafter is None:
            return True
        if isinstance(self.verifier, str):
            from specdec.verifiers import LOSSLESS, get_verifier

            if self.verifier in LOSSLESS:
                return LOSSLESS[self.verifier]
            try:
                flag = getattr(get_verifier(self.verifier), "LOSSLESS", None)  # rapid:eta=5: False
            except ValueError:
                return None
        else:
            flag = getattr(self.verifier, "LOSSLESS", None)
        return None if flag is None else bool(flag)

    def model_id(self, target_id: str) -> str:
        """FastChat model_id: `<target>-<slug(label)>` (the baseline: `<target>-baseline`)."""
        if self.drafter is None and self.name is None:
            return f"{target_id}-ar"
        return f"{target_id}-{slug(self.label)}"

    def build(self, params, cfg) -> dict:
        """Engine keyword arguments for `generate`/`warmup`: drafter, draft_params, builder, verifier.

        Empty for autoregressive decoding. Raises ValueError naming the bad part.
        """
        if self.drafter is None:
            return {}
        from specdec.drafters import parse_drafter
        from specdec.trees import fit, parse_tree
        from specdec.verifiers import get_verifier

        try:
            builder = parse_tree(self.tree)
            verifier = get_verifier(self.verifier) if isinstance(self.verifier, str) else self.verifier
            drafter, dparams = parse_drafter(self.drafter, params, cfg, max_depth=builder.max_depth)
            builder = fit(builder, drafter)  # a fused drafter (eagle+ngram) fuses its retrieval paths
        except ValueError as e:
            raise ValueError(f"method {self.label!r}: {e}") from None
        return dict(drafter=drafter, draft_params=dparams, builder=builder, verifier=verifier)


def slug(text: str) -> str:
    """A file-name-safe id: `ngram|chain:4|auto` -> `ngram-chain4-auto`."""
    s = text.replace("|", "-").replace(",", "_")
    s = re.sub(r"[^A-Za-z0-9._-]+", "", s)
    return re.sub(r"-{2,}", "-", s).strip("-") or "method"


def target_id(target: str) -> str:
    """Short id of a target spec: a registry name as is, a path by its last component."""
    name = target.rstrip("/").split("/")[-1]
    for ext in (".gguf", ".safetensors"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return slug(name) or "target"
