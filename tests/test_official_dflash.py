"""Importing released DFlash checkpoints (z-lab's `*-DFlash-b16` format,
`specdec.drafters.official_dflash`): numerics against an independent torch forward, lossless in the
decode loop, refusals (DFlash-2, another target)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from specdec.drafters.checkpoint import DrafterCheckpointError  # noqa: E402
from specdec.drafters.official import is_official, load_official  # noqa: E402
from specdec.generate import generate  # noqa: E402
from specdec.matmul import plain  # noqa: E402
from specdec.models import to_device  # noqa: E402
from specdec.trees import parse_tree  # noqa: E402
from tests.official_ref import PROMPTS, H, assert_close, dflash_config, dflash_sd, j, save, t_dflash  # noqa: E402


@pytest.fixture(scope="module")
def target(tiny_models):
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    return to_device(loaded.params, cfg), cfg


def test_dflash_numerics_and_lossless(target, tmp_path):
    from specdec.drafters import dflash

    params, cfg = target
    sd = dflash_sd()
    folder = save(tmp_path / "df", sd, "model.safetensors", dflash_config())
    assert is_official(folder) == "dflash"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        d, dp = load_official(folder, params, cfg)
    assert d.cfg.taps == (1, 2) and d.cfg.block_size == 4  # target layer id i = HF hidden_states[i + 1]
    g = torch.Generator().manual_seed(3)
    t = 6
    tokens = torch.randint(0, cfg.vocab_size, (2, t + 1), generator=g)  # the anchor at position t
    taps = [torch.randn(2, t + 1, H, generator=g) for _ in range(2)]
    emb = torch.from_numpy(np.asarray(params["embed"], np.float32))
    head = torch.from_numpy(
        np.asarray(plain(params["lm_head"]) if "lm_head" in params else params["embed"].T)
    )
    block_emb = torch.cat([emb[tokens[:, t]][:, None], emb[7][None, None].expand(2, 3, H)], 1)
    ctx_pos = torch.arange(t)[None].expand(2, t)
    want = t_dflash(
        sd,
        2,
        torch.cat([x[:, :t] for x in taps], -1),
        block_emb,
        ctx_pos,
        t + torch.arange(4)[None].expand(2, 4),
        head,
    )
    got = dflash.draft_logits(dp, d.cfg, dflash.train_forward(dp, d.cfg, j(tokens), tuple(j(x) for x in taps),
                                                                jnp.full((2, 1), t, jnp.int32)))  # fmt: skip
    assert_close(np.asarray(got)[:, 0], want.detach())
    ar = generate(params, cfg, PROMPTS, max_new_tokens=12).tokens
    for tree in ("chain:3", "dynamic:depth=3,topk=2,n=6"):
        out = generate(
            params, cfg, PROMPTS, max_new_tokens=12, drafter=d, draft_params=dp, builder=parse_tree(tree)
        )
        assert out.tokens == ar
    # refusals: DFlash-2 modules, another target
    bad = save(tmp_path / "df2", dflash_sd(dflash2=True), "model.safetensors", dflash_config())
    with pytest.raises(DrafterCheckpointError, match="DFlash-2"):
        load_official(bad, params, cfg)
    other = save(tmp_path / "dfo", sd, "model.safetensors", {**dflash_config(), "num_target_layers": 36})
    with pytest.raises(DrafterCheckpointError, match="num_target_layers=36"):
        load_official(other, params, cfg)
