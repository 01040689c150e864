"""The family registry (`specdec.drafters.family`) and the worked example of docs/drafters.md,
"Adding a trained family": its one new file and one registry line give a family that trains on a tiny
target, saves and loads its checkpoint and drafts in the loop (greedy output = AR)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import re
import sys

import pytest

from specdec.drafters import checkpoint as ckpt
from specdec.drafters import family

pytest.importorskip("torch")  # the tiny target of `tiny_cache` (tests/conftest.py)

ROOT = pathlib.Path(__file__).parents[1]


def _example() -> tuple[str, str]:
    """(the new file, the registry diff) of the doc's "Adding a trained family" section."""
    doc = (ROOT / "docs" / "drafters.md").read_text()
    # tests/test_spec.py runs the page's last plain ```python block: it must stay RepeatDrafter
    assert "class RepeatDrafter" in re.findall(r"```python\n(.*?)```", doc, re.S)[-1]
    section = doc[doc.index("## Adding a trained family") :]
    code = re.search(r"```python drafters/bigram\.py\n(.*?)```", section, re.S).group(1)
    diff = re.search(r"```diff\n(.*?)```", section, re.S).group(1)
    return code, diff


def test_the_registry_line_applies_to_the_registry():
    """The doc's diff adds one line to `ENTRIES` of today's drafters/family.py, and nothing else."""
    _, diff = _example()
    lines = [ln for ln in diff.splitlines() if not ln.startswith(("--- ", "+++ ", "@@"))]
    added = [ln[1:] for ln in lines if ln.startswith("+")]
    assert len(added) == 1 and not any(ln.startswith("-") for ln in lines)
    before = "\n".join(ln[1:] for ln in lines if ln.startswith(" "))
    after = "\n".join(ln[1:] for ln in lines if not ln.startswith("-"))
    source = (ROOT / "drafters" / "family.py").read_text()
    assert source.count(before) == 1
    patched = ast.parse(source.replace(before, after))
    (entries,) = [ast.literal_eval(n.value) for n in patched.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ENTRIES"]  # fmt: skip
    assert entries == family.ENTRIES + ("specdec.drafters.bigram:FAMILY",)


@pytest.fixture
def bigram(tmp_path, monkeypatch):
    """The doc's drafters/bigram.py as the module `specdec.drafters.bigram`, its family registered
    through its registry line (removed again afterwards)."""
    code, diff = _example()
    (line,) = [
        ast.literal_eval(ln[1:].strip().rstrip(",")) for ln in diff.splitlines() if ln.startswith("+ ")
    ]
    path = tmp_path / "bigram.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("specdec.drafters.bigram", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "specdec.drafters.bigram", module)
    spec.loader.exec_module(module)
    fam = family.register(family.resolve(line))
    yield fam
    family.unregister(fam.name)
    assert "bigram" not in family.FAMILIES


def test_the_worked_example_trains_loads_and_drafts_losslessly(bigram, tiny_cache, tmp_path):
    from specdec.compose import CompositionError
    from specdec.generate import generate
    from specdec.train import features, trainer
    from specdec.trees import parse_tree

    params, cfg, feats, exs, _ = tiny_cache
    assert family.lookup("bigram") is bigram and "bigram" in ckpt.FAMILIES
    with pytest.raises(ValueError, match="ttt_steps is an option of eagle3, not of bigram"):
        trainer.TrainConfig(family="bigram", options={"ttt_steps": 2})
    tc = trainer.TrainConfig(family="bigram", steps=40, batch_size=4, seq_len=40, lr=1e-2, warmup=4,
                             heldout=8, eval_every=40, save_every=40, draft_vocab=64,
                             options={"bigram_mlp": 32})  # fmt: skip
    out = trainer.train(tc, params, cfg, "tiny", features.FeatureSet.open(feats), tmp_path / "run",
                        progress=False, log=lambda s: None)  # fmt: skip
    losses = [h["loss"] for h in out["history"] if "loss" in h]
    assert losses[-1] < losses[0] and out["heldout"]["acc0"] > 0.25, out["heldout"]  # 0.75 here; chance 1/64

    meta, stored = ckpt.read(out["drafter"])
    assert meta["family"] == "bigram" and meta["training"]["train_config"]["bigram_mlp"] == 32
    assert "embed" not in stored and "head" not in stored  # shared with the target, never stored
    d, dp = ckpt.load(out["drafter"], params, cfg)
    assert type(d).__name__ == "Bigram" and d.cfg.mlp_size == 32 and d.taps == (cfg.num_layers,)

    prompts = [list(e.tokens[:12]) for e in exs[:3]]
    ar = generate(params, cfg, prompts, max_new_tokens=16).tokens
    taus = []
    for tree in ("chain:1", "dynamic:depth=1,topk=3,n=3"):
        spec = generate(params, cfg, prompts, max_new_tokens=16, drafter=d, draft_params=dp,
                        builder=parse_tree(tree))  # fmt: skip
        assert spec.tokens == ar, tree
        taus.append(spec.tau)
    assert max(taus) > 1.0, taus  # it drafts tokens the target accepts (1.05 and 1.17 here)
    with pytest.raises(CompositionError):  # one depth: a deeper tree is refused before compiling
        generate(
            params, cfg, prompts, max_new_tokens=4, drafter=d, draft_params=dp, builder=parse_tree("chain:2")
        )


def test_registry_lookups_and_checkpoint_names():
    names = list(family.FAMILIES)
    assert names == ["medusa", "amphista", "eagle", "eagle3", "falcon", "dflash", "s2d", "medusa2"]
    with pytest.raises(ValueError) as e:
        family.lookup("eagle4")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in names)
    with pytest.raises(ValueError, match="already registered"):
        family.register(dataclasses.replace(family.FAMILIES["medusa"]))
    family.unregister("medusa")  # a built-in family stays
    assert "medusa" in family.FAMILIES
    # EAGLE-1 and EAGLE-3 share the stored name "eagle", told apart by config.version
    from specdec.drafters import shipped_path

    for name in names:
        if ckpt.is_checkpoint(shipped_path(name)):
            meta, _ = ckpt.read(shipped_path(name))
            # Medusa-2 exports its heads as a Medusa drafter (for its new target)
            want = "medusa" if family.FAMILIES[name].export is not None else name
            assert ckpt.family_of(meta).name == want
            assert meta["family"] == family.FAMILIES[want].stored
    assert family.stored_names() == ["medusa", "amphista", "eagle", "falcon", "dflash", "s2d", "medusa2"]


def test_train_flags_are_scoped_to_their_family():
    """specdec-train defines every family option as a flag (the names stay the user contract) and
    refuses one given for a family that lacks it, as one line."""
    from absl import app

    from specdec.cli.entry import parse_flags
    from specdec.train import cli

    assert set(cli.FAMILY_OPTIONS) == {"heads", "own_heads", "noise", "align_steps", "ttt_steps", "falcon_k",
                                       "dflash_layers", "block_size", "num_anchors", "dflash_weighting",
                                       "dflash_gamma", "dflash_init", "exits", "conf_weight", "positions",
                                       "backbone_layers", "heads_weight", "heads_lr"}  # fmt: skip
    cases = [
        (["--drafter", "medusa", "--ttt_steps", "2"], "--ttt_steps is an option of eagle3, not of medusa"),
        (["--drafter", "eagle3", "--align_steps", "2"], "--align_steps is an option of eagle, not of eagle3"),
        (
            ["--drafter", "eagle", "--heads", "2"],
            "--heads is an option of medusa, amphista and medusa2, not of eagle",
        ),
    ]
    try:
        for argv, msg in cases:
            parse_flags(cli.FLAGS, ["specdec-train", *argv])
            with pytest.raises(app.UsageError) as e:
                cli.family_options(cli.FLAGS.drafter)
            assert str(e.value) == msg
        parse_flags(cli.FLAGS, ["specdec-train", "--drafter", "falcon", "--noise", "0.2", "--falcon_k", "3"])
        opts = cli.family_options("falcon")
        assert dataclasses.asdict(opts) == {"falcon_k": 3, "noise": 0.2}
        parse_flags(cli.FLAGS, ["specdec-train", "--drafter", "amphista", "--heads", "3"])
        assert cli.family_options("amphista") == family.FAMILIES["medusa"].options(heads=3)
    finally:
        parse_flags(cli.FLAGS, ["specdec-train"])
