"""The trained drafter families: one `Family` entry each, and the registry `FAMILIES` (name -> Family).

A family is everything the engine needs of a trained drafter, in one place:

- `name`: its `specdec-train --drafter` name, the name of its shipped drafter (`--drafter eagle3`)
  and of its folder in `specdec/data/drafters/`;
- `config` / `drafter`: its config dataclass (stored in `drafter.json`) and drafter class
  (`drafter(config)` is the drafter; the contract is `specdec.drafter`);
- `shares(config)`: the target arrays its runtime params take by reference, never stored in a
  checkpoint: "embed" (the target's embedding), "head" (the target's LM head at the draft
  vocabulary's rows `d2t`) and "layers" (the target's decoder layers: a drafter made of the
  target's first layers, S2D); `bind` adds them at load time and the trainer holds the first two
  frozen (a loss over cached features does not run the layers);
- `options`: a frozen dataclass of its training options, each field a `specdec-train` flag of the
  same name (`option(default, help)`); a flag given for a family that does not have it is refused;
- `build(options, tc, target, key) -> Built`: its config, initial trainable params and loss for a
  training run (`tc`: the run's general settings, `specdec.train.trainer.TrainConfig`; `target`:
  `TrainTarget`);
- per-step extras: `loss_takes_step` (the loss gets the global step, Falcon's CSGD schedule) and
  `eval_kwargs` (what the held-out evaluation passes to the loss, EAGLE-1's `noise=0`);
- `inference`: the options of the shipped name, `--drafter eagle:conf=0.5`, `dflash:block=4`;
- `stored` / `variant`: its `drafter.json` "family" (default: `name`) and the config fields that
  tell it apart from another family stored under the same name (EAGLE-1 and EAGLE-3 are both
  stored as "eagle", with `config.version` 1 and 3);
- `taps(options, num_layers)`: target taps its loss reads beyond the feature cache's default ones
  (S2D's exits, Medusa-2's first trained layer's input);
- `export(config, params, target, out, training) -> Export`: what the run writes instead of its
  trained params as one drafter (Medusa-2: a new target under `out/target` and the heads as a
  Medusa drafter for it); `warm_start`: stored family -> `fn(meta, loaded, config, params) -> params`
  for `--init_from` checkpoints of another family (Medusa-2 starts from Medusa-1 heads);
- `Built.lr_scale`: learning-rate multipliers of top-level param groups (Medusa-2's heads x4);
- `depth(config)`: the target layers its drafter reads, when not all (S2D: its last exit); its
  checkpoint then fits any target that shares those layers (drafter.json "backbone_layers").

Adding a trained family is one new drafter module that defines its `Family` and one line in
`ENTRIES` (docs/drafters.md, "Adding a trained family"); a family that lives outside this package
is added with `register(family)`. `ENTRIES` names the entries as "module:attribute" and the registry
imports them on first use: the drafter modules import this one (for `Family`), so it imports none of
them at module level, and a family's `build` imports `specdec.train.losses` (which imports the
drafter modules) inside the function.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

# The built-in trained families, in `specdec-train --drafter` order: "module:attribute" of each entry.
ENTRIES = (
    "specdec.drafters.medusa:FAMILY",
    "specdec.drafters.amphista:FAMILY",
    "specdec.drafters.eagle:EAGLE1",
    "specdec.drafters.eagle:EAGLE3",
    "specdec.drafters.falcon:FAMILY",
    "specdec.drafters.dflash:FAMILY",
    "specdec.drafters.s2d:FAMILY",
    "specdec.drafters.medusa2:FAMILY",
)

SHARED = ("embed", "head", "layers")  # the target arrays a family may share by reference


def option(default, help: str, **flag) -> Any:
    """A training option: a dataclass field whose default and help become a specdec-train flag;
    `flag` adds the flag's `lower_bound` or `choices` (a str option with choices is an enum flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a family that has no training options of its own."""


@dataclasses.dataclass(frozen=True)
class TrainTarget:
    """What a family's `build` sees of the frozen target: its `ModelConfig`, its (device) params, the
    draft vocabulary `d2t` (None: the whole vocabulary) and the target's LM head `[D, Vd]` at the rows
    `d2t` (plain layout: to initialise an own head from)."""

    cfg: Any
    params: dict
    d2t: Any
    head: Any
    source: str = ""  # where the target came from (a registry name or path: `load_model`'s spec)

    @property
    def draft_vocab_size(self) -> int | None:
        return None if self.d2t is None else len(self.d2t)


@dataclasses.dataclass(frozen=True)
class Built:
    """A family's `build`: its config, initial trainable params and loss
    `loss(runtime_params, *, batch, t2d, key, **extra) -> (loss, metrics)`, where runtime params are
    the trainable ones plus the frozen arrays: "target_head" (the target's head at `d2t`, for soft
    targets), the shared arrays (`Family.shares`) and `frozen` (any further frozen arrays)."""

    config: Any
    params: dict
    loss: Callable[..., tuple]
    frozen: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr_scale: Mapping[str, float] = dataclasses.field(default_factory=dict)  # top-level key -> LR x


@dataclasses.dataclass(frozen=True)
class Export:
    """The drafter checkpoint a family's `export` asks the trainer to write: its stored family,
    config and params, and its drafter.json "target" (`checkpoint.target_info` of its target)."""

    family: str
    config: Any
    params: dict
    target: dict


@dataclasses.dataclass(frozen=True)
class InferenceOption:
    """An option of a shipped drafter's name, `NAME:KEY=VALUE`: `parse` reads the value (a ValueError
    refuses it with `usage`), `apply(drafter, value)` returns the drafter it asks for. `usage` shows
    it, with `{name}` for the family's name: "{name}:conf=0.5 (draft only when confident)"."""

    parse: Callable[[str], Any]
    apply: Callable[[Any, Any], Any]
    usage: str


@dataclasses.dataclass(frozen=True)
class Family:
    """A trained drafter family (see the module docstring)."""

    name: str
    config: type
    drafter: type
    shares: Callable[[Any], Collection[str]]
    build: Callable[[Any, Any, TrainTarget, Any], Built]
    options: type = NoOptions
    loss_takes_step: bool = False
    eval_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inference: Mapping[str, InferenceOption] = dataclasses.field(default_factory=dict)
    stored: str = ""  # its drafter.json "family"; "" = name
    variant: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shipped: bool = False  # a checkpoint ships in specdec/data/drafters/<name>
    taps: Callable[[Any, int], tuple[int, ...]] | None = None  # (options, target's layers) -> taps it reads
    export: Callable[..., Export] | None = None  # (config, params, target, out, training) -> Export
    depth: Callable[[Any], int] | None = None  # config -> the target layers its drafter reads; None: all
    warm_start: Mapping[str, Callable[..., dict]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "stored", self.stored or self.name)

    def shared(self, config) -> frozenset[str]:
        """The target arrays this family's drafter with `config` takes by reference."""
        out = frozenset(self.shares(config))
        if not out <= set(SHARED):
            raise ValueError(f"family {self.name}: shares {sorted(out - set(SHARED))}; it may share {SHARED}")
        return out

    def claims(self, config) -> bool:
        """Whether a config stored under `self.stored` is this family's (its `variant` fields)."""
        return all(getattr(config, k, None) == v for k, v in self.variant.items())

    def make_options(self, values: Mapping[str, Any] | None = None):
        """The family's options from `values` (defaults for the rest); a name it lacks is refused with
        the families that have it."""
        values = dict(values or {})
        fields = {f.name for f in dataclasses.fields(self.options)}
        for k in values:
            if k not in fields:
                raise ValueError(refusal(k, self.name))
        return self.options(**values)


def refusal(option_name: str, family_name: str, *, flag: bool = False) -> str:
    """The one-line error for an option given to a family that lacks it (`flag`: named as --flag)."""
    owners = [f.name for f in FAMILIES.values() if option_name in option_fields(f.options)]
    what = f"--{option_name}" if flag else option_name
    if owners:
        listed = owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"
        return f"{what} is an option of {listed}, not of {family_name}"
    have = list(option_fields(FAMILIES[family_name].options)) if family_name in FAMILIES else []
    return f"{what} is not an option of {family_name} (its options: {', '.join(have) or 'none'})"


@dataclasses.dataclass(frozen=True)
class OptionField:
    """A training option as a flag: its name, default, type (resolved: annotations are strings under
    `from __future__ import annotations`) and metadata (help, lower_bound, choices)."""

    name: str
    default: Any
    type: Any
    metadata: Mapping[str, Any]


def option_fields(options: type) -> dict[str, OptionField]:
    """name -> `OptionField` of an options dataclass, in definition order."""
    hints = typing.get_type_hints(options)
    return {f.name: OptionField(f.name, f.default, hints.get(f.name, type(f.default)), f.metadata)
            for f in dataclasses.fields(options)}  # fmt: skip


# ------------------------------------------------------------------------------------------- registry
class _Registry(Mapping):
    """name -> Family: the built-in `ENTRIES` (imported on first use), then the registered ones."""

    def __init__(self):
        self._families: dict[str, Family] = {}
        self._loaded = False

    def _load(self) -> dict[str, Family]:
        if not self._loaded:
            families: dict[str, Family] = {}
            for entry in ENTRIES:
                _add(families, resolve(entry))
            self._families, self._loaded = families, True
        return self._families

    def __getitem__(self, name: str) -> Family:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return f"FAMILIES({', '.join(self)})"


FAMILIES = _Registry()


def resolve(entry: str) -> Family:
    """The `Family` an `ENTRIES` line names ("module:attribute")."""
    module, _, attr = entry.partition(":")
    family = getattr(importlib.import_module(module), attr or "FAMILY")
    if not isinstance(family, Family):
        raise TypeError(f"drafter family entry {entry!r} is a {type(family).__name__}, not a Family")
    return family


def _add(families: dict[str, Family], family: Family) -> None:
    if not isinstance(family, Family):
        raise TypeError(f"register() takes a Family, got a {type(family).__name__}")
    if families.get(family.name, family) is not family:
        raise ValueError(f"a drafter family named {family.name!r} is already registered")
    if not dataclasses.is_dataclass(family.options):
        raise TypeError(f"family {family.name}: options must be a dataclass, got {family.options!r}")
    for name, f in option_fields(family.options).items():
        if f.default is dataclasses.MISSING:
            raise ValueError(f"family {family.name}: option {name} needs a default (it is a flag)")
    families[family.name] = family


def register(family: Family) -> Family:
    """Add a family that is not in `ENTRIES` (a plugin); its name must be new. Returns it."""
    _add(FAMILIES._load(), family)
    return family


def unregister(name: str) -> None:
    """Remove a family added with `register` (tests, notebooks); the built-in ones stay."""
    if name not in {resolve(e).name for e in ENTRIES}:
        FAMILIES._load().pop(name, None)


def lookup(name: str) -> Family:
    """The family named `name`, or a one-line ValueError listing the valid names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown drafter family {name!r}; the trained families are {', '.join(FAMILIES)}"
        ) from None


def stored_names() -> list[str]:
    """The `drafter.json` family names the registry can read, in registry order."""
    return list(dict.fromkeys(f.stored for f in FAMILIES.values()))


def config_class(stored: str) -> type:
    """The config dataclass of the families stored as `stored` (they share it)."""
    for f in FAMILIES.values():
        if f.stored == stored:
            return f.config
    raise ValueError(f"unknown drafter family {stored!r}; this specdec knows {', '.join(stored_names())}")


def for_checkpoint(stored: str, config) -> Family:
    """The family of a checkpoint stored as `stored` with `config` (EAGLE-1 vs EAGLE-3 by version)."""
    candidates = [f for f in FAMILIES.values() if f.stored == stored]
    for f in candidates:
        if f.claims(config):
            return f
    if not candidates:
        raise ValueError(f"unknown drafter family {stored!r}; this specdec knows {', '.join(stored_names())}")
    tells = "; ".join(f"{f.name}: {dict(f.variant)}" for f in candidates)
    raise ValueError(f"a {stored} drafter whose config matches none of its families ({tells})")
