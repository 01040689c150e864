"""The engine's contracts: compositions refused before compiling, tree and loop invariants checked in
the loop (with the step and row of a break), finished rows frozen, the committed cache equal to a
fresh prefill, and byte-identical step traces from the fused and the host loop for every tree kind."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import KVCache, causal_mask
from specdec.compose import CompositionError, make_spec
from specdec.decode import prefill_jit, step_jit
from specdec.drafters import NGram, layer_skip
from specdec.drafters.medusa import Medusa, MedusaConfig
from specdec.generate import InvariantError, generate, pad_prompts
from specdec.invariants import check_tree
from specdec.models import forward, to_device
from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.trees import parse_tree
from specdec.verifiers import get_verifier
from tests.sharded_worker import CFG, PROMPTS, random_params

T0, T1 = SamplingConfig(), SamplingConfig(temperature=1.0)


@pytest.fixture(scope="module")
def model():
    params = to_device(random_params(CFG, 0), CFG, "plain")
    drafter, dparams = layer_skip(params, CFG, 1)
    return params, drafter, dparams


# ------------------------------------------------------------------ composition, refused up front


def test_refuses_a_tree_deeper_than_the_drafter_drafts():
    medusa = Medusa(MedusaConfig.for_target(CFG, 4))
    make_spec(CFG, T0, medusa, parse_tree("static:medusa63"))  # depth 4: fits
    with pytest.raises(
        CompositionError, match=r"chain:8 is 8 deep but Medusa drafts at most 4 .*e\.g\. chain:4"
    ):
        make_spec(CFG, T0, medusa, parse_tree("chain:8"))
    with pytest.raises(CompositionError, match="at most 3 depths"):
        make_spec(CFG, T0, NGram(CFG.vocab_size, max_depth=3), parse_tree("chain:5"))


def test_refuses_a_verifier_that_cannot_take_the_trees_siblings(model):
    _, d, _ = model
    with pytest.raises(CompositionError, match="specinfer_verify needs iid siblings.*--verifier auto"):
        make_spec(CFG, T1, d, parse_tree("chain:3"), get_verifier("specinfer"))
    with pytest.raises(
        CompositionError, match="spectr_verify needs iid .* rsd:2,2 draws without_replacement"
    ):
        make_spec(CFG, T1, d, parse_tree("rsd:2,2"), get_verifier("spectr"))
    make_spec(CFG, T1, d, parse_tree("rsd:2,2"), get_verifier("rrs"))  # fits
    with pytest.raises(CompositionError, match="block_verify verifies one drafted chain.*use chain:K"):
        make_spec(CFG, T1, d, parse_tree("rsd:2,2"), get_verifier("block"))
    make_spec(CFG, T1, d, parse_tree("chain:3,sample"), get_verifier("block"))
    with pytest.raises(CompositionError, match="temperature-0 verifier"):
        make_spec(CFG, T1, d, parse_tree("chain:3"), get_verifier("greedy"))
    make_spec(CFG, T0, d, parse_tree("chain:3"), get_verifier("greedy"))


def test_refuses_drafters_and_builders_that_break_their_contract(model):
    _, d, _ = model

    @dataclasses.dataclass(frozen=True)
    class NoBegin:
        taps: tuple = ()
        vocab_size: int = CFG.vocab_size
        adaptive: bool = True

        def init(self, *a, **k): ...
        def expand(self, *a): ...
        def update(self, *a): ...

    with pytest.raises(CompositionError, match=r"NoBegin lacks begin, should_draft \(adaptive = True\)"):
        make_spec(CFG, T0, NoBegin(), parse_tree("chain:2"))
    with pytest.raises(CompositionError, match="differs from the target's"):
        make_spec(CFG, T0, NGram(CFG.vocab_size + 1, max_depth=2), parse_tree("chain:2"))
    with pytest.raises(CompositionError, match="needs a tree builder"):
        make_spec(CFG, T0, d, None)
    with pytest.raises(CompositionError, match="needs a drafter"):
        make_spec(CFG, T0, None, parse_tree("chain:2"))

    @dataclasses.dataclass(frozen=True)
    class NoWindow:
        num_nodes: int = 3
        max_depth: int = 2

        def __call__(self, *a): ...

    with pytest.raises(CompositionError, match="NoWindow lacks window"):
        make_spec(CFG, T0, d, NoWindow())


# ------------------------------------------------------------------ tree invariants


def _uniform(tree):
    return jnp.full(tree.tokens.shape + (CFG.vocab_size,), 1.0 / CFG.vocab_size)


def _chain(n=4, b=2):
    return Tree.chain(jnp.broadcast_to(jnp.arange(3, 3 + n, dtype=jnp.int32), (b, n)))


@pytest.mark.parametrize(
    "name,corrupt",
    [
        ("root", lambda t: t.replace(valid=t.valid.at[1, 0].set(False))),
        ("parent", lambda t: t.replace(parents=t.parents.at[1, 2].set(3))),
        ("parent", lambda t: t.replace(parents=t.parents.at[1, 2].set(-1))),
        ("ancestry", lambda t: t.replace(valid=t.valid.at[1, 1].set(False))),
        ("depth", lambda t: t.replace(depth=t.depth.at[1, 3].set(2))),
        ("token", lambda t: t.replace(tokens=t.tokens.at[1, 2].set(CFG.vocab_size))),
        ("probs", lambda t: t.replace(draft_probs=_uniform(t).at[1, 1, 0].add(0.5))),
    ],
)
def test_check_tree_names_each_broken_invariant(name, corrupt):
    good = _chain()
    check_tree(good.replace(draft_probs=_uniform(good)), CFG.vocab_size, jnp.asarray([5, 5]), 16)
    with pytest.raises(ValueError, match=f"row 1: tree invariant '{name}'"):
        check_tree(corrupt(good), CFG.vocab_size)


def test_check_tree_refuses_a_block_past_the_cache():
    with pytest.raises(ValueError, match="row 0: tree invariant 'cache'"):
        check_tree(_chain(), CFG.vocab_size, jnp.asarray([13, 5]), 16)


@dataclasses.dataclass(frozen=True)
class LateBreak:
    """A builder that corrupts row 1's tree once that row has committed 4 tokens past its prompt."""

    inner: object
    at_length: int

    num_nodes = property(lambda self: self.inner.num_nodes)
    max_depth = property(lambda self: self.inner.max_depth)
    window = property(lambda self: self.inner.window)

    def __call__(self, drafter, params, state, ctx, key, sampling):
        tree, state = self.inner(drafter, params, state, ctx, key, sampling)
        bad = (jnp.arange(ctx.lengths.shape[0]) == 1) & (ctx.lengths >= self.at_length)
        return tree.replace(parents=tree.parents.at[:, 2].set(jnp.where(bad, 3, tree.parents[:, 2]))), state


def test_check_fails_with_the_step_and_row(model):
    params, d, dp = model
    builder = LateBreak(parse_tree("chain:3"), at_length=len(PROMPTS[1]) + 5)
    kw = dict(max_new_tokens=16, drafter=d, draft_params=dp, builder=builder)
    generate(params, CFG, PROMPTS, **kw)  # unchecked, the broken tree goes through without a word
    with pytest.raises(InvariantError, match=r"step [1-9]\d*, row 1: invariant 'parent' broken"):
        generate(params, CFG, PROMPTS, check=True, **kw)


# ------------------------------------------------------------------ finished rows, committed cache


def _prefilled(params, d, dp, builder, max_new=12):
    spec = make_spec(CFG, T0, d, builder)
    prompt, lens, size = pad_prompts(PROMPTS, CFG, max_new, None, spec.cache_window)
    eos = jnp.asarray([-1], jnp.int32)
    state = prefill_jit(params, dp, jnp.asarray(prompt), jnp.asarray(lens), jax.random.key(0), eos, max_new,
                        spec=spec, cache_size=size)  # fmt: skip
    return spec, state, eos, max_new


def test_finished_rows_are_frozen(model):
    """A finished row commits no KV and appends no tokens while the others go on (before, its cache
    length grew every step past what the cache holds)."""
    params, d, dp = model
    spec, state, eos, max_new = _prefilled(params, d, dp, parse_tree("chain:3"))
    state = state.replace(done=state.done.at[0].set(True))
    cache0, length0 = int(state.cache.lengths[0]), int(state.length[0])
    others = np.asarray(state.length[1:])
    for _ in range(3):
        state = step_jit(params, dp, state, eos, max_new, spec=spec)
    assert (int(state.cache.lengths[0]), int(state.length[0])) == (cache0, length0)
    assert (np.asarray(state.length[1:]) > others).all()
    assert int(state.row_steps[0]) == 0


def test_rows_that_finish_early_pass_the_loop_invariants(model):
    """EOS ends one row early; with check=True every step's invariants hold, the finished row's
    included ('frozen': it commits nothing after its EOS)."""
    params, d, dp = model
    ar = generate(params, CFG, PROMPTS, max_new_tokens=12)
    eos = [ar.tokens[0][2]]  # row 0 stops at its third token
    kw = dict(max_new_tokens=12, eos_ids=eos, check=True)
    spec_out = generate(params, CFG, PROMPTS, drafter=d, draft_params=dp, builder=parse_tree("chain:3"), **kw)
    assert spec_out.tokens == generate(params, CFG, PROMPTS, **kw).tokens
    assert spec_out.tokens[0][-1] == eos[0] and len(spec_out.tokens[0]) <= 3


@pytest.mark.parametrize("tree", ["chain:3", "dynamic:depth=3,topk=3,n=10"])
def test_committed_cache_equals_a_fresh_prefill(model, tree):
    """After several steps (tree blocks, commits of accepted paths), each row's cache prefix equals
    the KV of one prefill over its committed tokens (the root excluded: not in the cache yet)."""
    params, d, dp = model
    spec, state, eos, max_new = _prefilled(params, d, dp, parse_tree(tree))
    for _ in range(4):
        state = step_jit(params, dp, state, eos, max_new, spec=spec)
    for b in range(len(PROMPTS)):
        n = int(state.cache.lengths[b])
        assert n == int(state.length[b]) - 1
        toks = state.tokens[b : b + 1, :n]
        _, _, fresh = forward(
            params, CFG, toks, jnp.arange(n)[None], KVCache.init(CFG, 1, n), causal_mask(1, n)
        )
        np.testing.assert_allclose(state.cache.k[:, b, :n], fresh.k[:, 0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(state.cache.v[:, b, :n], fresh.v[:, 0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ traces


# One per builder family (chains, static, dynamic, recursive, budgets, a token-level adaptive
# drafter); greedy = AR for every builder is tests/test_spec.py's.
TREE_KINDS = [
    ("chain:3,sample", T1),
    ("static:[(0,),(1,),(0,0),(0,1),(1,0),(0,0,0)]", T0),
    ("dynamic:depth=3,topk=3,n=10", T1),
    ("rsd-beam:depth=3,beam=2", T1),
    ("dynamic:depth=3,topk=3,n=10+budget:5", T0),
    ("ngram|chain:4", T0),  # token-level lookup (adaptive: AR steps where no row has a match)
]


@pytest.mark.parametrize("tree,sampling", TREE_KINDS, ids=[t for t, _ in TREE_KINDS])
def test_traces_equal_across_loops_for_every_tree_kind(model, tmp_path, tree, sampling):
    """The fused `lax.while_loop` and the host loop write the same trace bytes (no timings in it),
    the invariants hold every step, and every traced tree passes `check_tree`'s rules."""
    params, d, dp = model
    if tree.startswith("ngram|"):
        tree = tree.removeprefix("ngram|")
        d, dp = NGram(CFG.vocab_size, max_depth=parse_tree(tree).max_depth), None
    kw = dict(max_new_tokens=10, drafter=d, draft_params=dp, builder=parse_tree(tree), sampling=sampling,
              seed=1, check=True)  # fmt: skip
    outs = [
        generate(params, CFG, PROMPTS, loop=loop, trace=tmp_path / loop, **kw)
        for loop in ("device", "python")
    ]
    assert (tmp_path / "device").read_bytes() == (tmp_path / "python").read_bytes()
    assert outs[0].tokens == outs[1].tokens
    lines = [json.loads(x) for x in (tmp_path / "device").read_text().splitlines()]
    assert [x["row"] for x in lines[:3]] == [0, 1, 2] and lines[0]["step"] == 0
    for x in lines:
        nodes = x["nodes"]
        assert nodes[0][2] == -1 and all(0 <= p < i for i, _, p in nodes[1:])
        # the accepted path (root included) is committed; the tokens appended are its drafts plus
        # the bonus, cut only where the row finished
        assert x["cache_after"] - x["cache_before"] == len(x["path"]) >= len(x["accepted"]) >= 1
    assert len(lines) == sum(outs[0].row_steps)  # one line per step and running row


def test_a_drafters_fallback_is_named_once_in_the_log(caplog):
    """n-gram lookup declares what a row without a match drafts; composing it logs that once."""
    import logging

    from specdec import compose

    compose._say.cache_clear()
    d = NGram(CFG.vocab_size, max_depth=3)
    with caplog.at_level(logging.INFO, logger="specdec"):
        for _ in range(3):
            make_spec(CFG, T0, d, parse_tree("chain:3"))
    said = [r.getMessage() for r in caplog.records if "n-gram lookup" in r.getMessage()]
    assert len(said) == 1 and "plain AR step" in said[0]


def test_the_core_imports_no_plugin_package():
    """`specdec/` (the loop, cache, models, verifiers, contracts) imports none of the plugin packages
    (drafters, trees, train, eval) at module level: a plugin depends on the core, never back."""
    import ast
    import pathlib

    plugins = ("specdec.drafters", "specdec.trees", "specdec.train", "specdec.eval")
    core = pathlib.Path(__file__).parents[1] / "specdec"
    found = []
    for path in core.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.relative_to(core)}: {n}" for n in names if n.startswith(plugins)]
    assert not found
