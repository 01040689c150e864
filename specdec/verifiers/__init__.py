"""Verifiers: one file each; the protocol and `Verdict` live in `protocol.py`.

Every verifier has the protocol signature `verify(tree, target_logits, key, sampling) -> Verdict`.
Plain ones are module-level functions; parameterised ones are frozen (hashable) dataclasses with
`__call__`, configured by instantiation, e.g. `TypicalAcceptance(posterior_threshold=0.05)`.
`VERIFIERS` maps a name to a ready-to-use verifier; `LOSSLESS[name]` says whether it reproduces the
target's sampling distribution exactly (all but "typical"). "auto" (`auto_verify`, the decode
loop's default) picks a lossless verifier for any tree. See docs/verifiers.md.
"""

from specdec.verifiers import auto, block, greedy, rrs, specinfer, spectr, speculative, target_only, typical
from specdec.verifiers.auto import auto_verify
from specdec.verifiers.block import block_verify
from specdec.verifiers.greedy import greedy_verify
from specdec.verifiers.protocol import Verdict, Verifier
from specdec.verifiers.rapid import Rapid, parse_rapid
from specdec.verifiers.rrs import rrs_verify
from specdec.verifiers.specinfer import specinfer_verify
from specdec.verifiers.spectr import spectr_verify
from specdec.verifiers.speculative import speculative_verify
from specdec.verifiers.target_only import target_only_verify
from specdec.verifiers.typical import TypicalAcceptance, typical_verify

VERIFIERS: dict[str, Verifier] = {
    "auto": auto_verify,
    "greedy": greedy_verify,
    "speculative": speculative_verify,
    "rrs": rrs_verify,
    "specinfer": specinfer_verify,
    "target_only": target_only_verify,
    "typical": typical_verify,
    "spectr": spectr_verify,
    "block": block_verify,
}
_MODULES = {
    "auto": auto,
    "greedy": greedy,
    "speculative": speculative,
    "rrs": rrs,
    "specinfer": specinfer,
    "target_only": target_only,
    "typical": typical,
    "spectr": spectr,
    "block": block,
}
LOSSLESS: dict[str, bool] = {name: m.LOSSLESS for name, m in _MODULES.items()}
SIBLING_MODES: dict[str, tuple[str, ...]] = {name: m.SIBLING_MODES for name, m in _MODULES.items()}


def requirements(verifier) -> tuple[tuple[str, ...] | None, bool, bool]:
    """(sibling modes the verifier accepts, or None if it does not say; whether it is the
    temperature-0 verifier; whether it verifies chains only). Registered verifiers declare them in
    their module (`SIBLING_MODES`, `GREEDY_ONLY`, `CHAIN_ONLY`); a user's verifier may carry the
    same names as attributes."""
    name = next((n for n, v in VERIFIERS.items() if v is verifier), None)
    source = _MODULES[name] if name is not None else verifier
    return (getattr(source, "SIBLING_MODES", None), getattr(source, "GREEDY_ONLY", False),
            getattr(source, "CHAIN_ONLY", False))  # fmt: skip


def get_verifier(name: str) -> Verifier:
    """The registered verifier called `name` (see `VERIFIERS`), or RAPID's parameterised one,
    `rapid:eta=5[,alpha=0.1,residual=official|exact]` (lossy for eta > 0: `specdec.verifiers.rapid`)."""
    if name == "rapid" or name.startswith("rapid:"):
        return parse_rapid(name)
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(
            f"unknown verifier {name!r}; valid names: {', '.join(sorted(VERIFIERS))}, rapid:eta=E"
        ) from None


__all__ = [
    "auto_verify",
    "block_verify",
    "LOSSLESS",
    "SIBLING_MODES",
    "VERIFIERS",
    "Rapid",
    "TypicalAcceptance",
    "Verdict",
    "Verifier",
    "get_verifier",
    "requirements",
    "greedy_verify",
    "rrs_verify",
    "speculative_verify",
    "specinfer_verify",
    "spectr_verify",
    "target_only_verify",
    "typical_verify",
]
