"""Self-distillation in one target pass: the target rewrites every assistant turn, and the feature
cache is written from the same forwards.

A drafter learns to predict the target; trained on ShareGPT's GPT-4 answers it learns contexts the
target never produces (an EAGLE-1 trained on ShareGPT answers, shipped until the retrain: its
teacher-forced top-1 drops from 0.42 on ShareGPT to ~0.30 on the target's own answers). So the user
turns are kept and each assistant turn is replaced by the target's own continuation of the
conversation so far (later turns see the regenerated history), as SpecForge, vLLM speculators and
NeMo do.

**One pass.** A conversation's token sequence is exactly what the target ran over while writing it:
the prompt parts (system, user turns, template markers) go through a prefill, every generated token
through a decode step, and both return the requested hidden taps and the target's argmax next token
at each position. Those are the feature cache (`features.py` layout), so no second extraction pass.
**Continuous batching.** `slots` conversations decode together; a slot whose turn ends gets the
next user turn appended to its own KV cache (only the new tokens are prefilled), and a slot whose
conversation ends takes the next conversation, so no row idles while the longest answer finishes.

Per conversation, at every position the same computation runs wherever the conversation sits in the
batch (row-independent kernels) and sampling keys are `fold_in(seed, conversation, position)`, so a
resumed run writes what an uninterrupted one would. Output, in `out_dir`:

    manifest.json               taps, target, sampling, max_len, shards done (+ their conversations)
    shard_00000/                 features of `shard_size` finished conversations (see features.py)
      conv_index.npy             int64 [S]  which input conversation each sequence is
      conversations.jsonl        the regenerated text (ShareGPT records, per-turn finish reasons)

A killed run resumes: finished shards are kept, conversations in flight are regenerated again.
`regenerated_set.export` gathers the text and token ids into a compact folder for the repository
(after every shard, with `on_shard`), from which `features.extract` rebuilds the features on a new
machine without regenerating, and a run there skips what the folder holds (`skip`).

Host bookkeeping of a conversation's turns is in `regen_turns.py`, the jitted device steps in
`regen_steps.py`; this module schedules slots and writes shards.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specdec.cache import KVCache
from specdec.generate import bucket
from specdec.models.config import ModelConfig
from specdec.train.features import FeatureCacheError, _read_manifest, _target_id, _write_manifest
from specdec.train.regen_steps import RegenConfig, decode_step, prefill_rows
from specdec.train.regen_turns import Conversation, Flight, end_turn, next_prompt, turn_tail

__all__ = ["RegenConfig", "regenerate", "turn_tail"]


class _Run:
    def __init__(self, params, cfg, tokenizer, convs, out: pathlib.Path, rc: RegenConfig, taps, eos, m,
                 prefill):  # fmt: skip
        self.params, self.cfg, self.tok, self.convs, self.out = params, cfg, tokenizer, convs, out
        self.rc = rc
        self.prefill_params, self.prefill_cfg = prefill
        self.taps, self.eos, self.m = taps, set(eos), m
        self.tail = turn_tail(tokenizer)
        self.key = jax.random.key(rc.seed)
        b = rc.slots
        cache = KVCache.init(cfg, b, rc.max_len)
        self.cache = cache.replace(v=jnp.zeros_like(cache.k))  # separate buffers: both are donated
        self.slots: list[Flight | None] = [None] * b
        self.buffer: list[Flight] = []
        self.skipped: list[int] = []
        self.tokens_done = 0
        self.t_shard = time.perf_counter()  # wall time per shard (compiles included), for the cost
        self.clock = {"prefill": [0.0, 0], "decode": [0.0, 0]}  # seconds, tokens (compiles included)

    def _end_turn(self, f: Flight, finish: str) -> None:
        end_turn(f, finish, self.tok, self.eos, self.tail, self.rc.max_len)

    # -- slots -------------------------------------------------------------------------------------
    def _finish(self, s: int) -> None:
        f = self.slots[s]
        self.slots[s] = None
        while f.msgs and f.msgs[-1]["role"] != "assistant":
            f.msgs.pop()
        if not any(f.mask[1:]):
            self.skipped.append(f.index)
        else:
            self.buffer.append(f)
        if len(self.buffer) >= self.rc.shard_size:
            self._write_shard()

    # -- device calls ------------------------------------------------------------------------------
    def _prefill(self, reqs: list[int]) -> None:
        """Prefill the pending deltas of slots `reqs`, in calls of bounded rows x length."""
        for s in [s for s in reqs if not self.slots[s].delta[0]]:  # nothing left to append
            self._finish(s)
        reqs = sorted(
            (s for s in reqs if self.slots[s] is not None), key=lambda s: len(self.slots[s].delta[0])
        )
        while reqs:
            t = bucket(len(self.slots[reqs[0]].delta[0]))
            group = []
            for s in reqs:
                tt = max(t, bucket(len(self.slots[s].delta[0])))
                if len(group) and bucket(len(group) + 1, 1) * tt > self.rc.prefill_tokens:
                    break
                group.append(s)
                t = tt
            reqs = reqs[len(group) :]
            self._prefill_call(group, t)

    def _prefill_call(self, group: list[int], t: int) -> None:
        t0 = time.perf_counter()
        b = bucket(len(group), 1)
        rows = np.full(b, self.rc.slots, np.int32)
        toks, n = np.zeros((b, t), np.int32), np.zeros(b, np.int32)
        reset, conv = np.zeros(b, bool), np.zeros(b, np.int32)
        k = len(self.tail) + 1
        heads = np.zeros((b, k), np.int32)
        for r, s in enumerate(group):
            f = self.slots[s]
            d, dm = f.delta
            rows[r], toks[r, : len(d)], n[r], reset[r], conv[r] = s, d, len(d), not f.ids, f.index
            # labels are needed where the next token is an answer token, and at the answer's tail
            need = sorted({i for i in range(len(d) - 1) if dm[i] or dm[i + 1]} | {len(d) - 1})
            need = need[-k:]  # n - 1 (sampled from) is the largest, so it is always kept last
            heads[r] = need + [len(d) - 1] * (k - len(need))
        nxt, top1, hs, self.cache = prefill_rows(
            self.prefill_params, self.cache, rows, toks, n, heads, reset, conv, self.key,
            cfg=self.prefill_cfg, sampling=self.rc.sampling, taps=self.taps,
        )  # fmt: skip
        nxt, top1, hs = jax.device_get((nxt, top1, hs))
        self.clock["prefill"][0] += time.perf_counter() - t0
        self.clock["prefill"][1] += int(n.sum())
        for r, s in enumerate(group):
            f = self.slots[s]
            d, dm = f.delta
            f.ids += d
            f.mask += dm
            t1 = [-1] * len(d)  # -1: not computed (a prompt position that predicts no label)
            for i, v in zip(heads[r], top1[r], strict=True):
                t1[i] = int(v)
            f.top1 += t1
            f.taps.append(hs[r, : len(d)])
            f.delta = None
            self.tokens_done += len(d)
            if f.last or len(f.ids) >= self.rc.max_len:
                self._finish(s)
            else:
                f.pending = int(nxt[r])
                self._check_stop(s)

    def _check_stop(self, s: int) -> None:
        f = self.slots[s]
        if f.pending in self.eos:
            self._end_turn(f, "eos")
        elif len(f.gen) >= self.rc.max_new_tokens:
            self._end_turn(f, "length")
        elif len(f.ids) >= self.rc.max_len:
            self._end_turn(f, "max_len")

    def _decode(self) -> None:
        t0 = time.perf_counter()
        b = self.rc.slots
        toks, active, conv = np.zeros(b, np.int32), np.zeros(b, bool), np.zeros(b, np.int32)
        for s, f in enumerate(self.slots):
            if f is not None and f.delta is None:
                toks[s], active[s], conv[s] = f.pending, True, f.index
        nxt, top1, hs, self.cache = decode_step(
            self.params, self.cache, toks, active, conv, self.key,
            cfg=self.cfg, sampling=self.rc.sampling, taps=self.taps,
        )  # fmt: skip
        nxt, top1, hs = jax.device_get((nxt, top1, hs))
        self.clock["decode"][0] += time.perf_counter() - t0
        self.clock["decode"][1] += int(active.sum())
        for s in np.flatnonzero(active):
            f = self.slots[s]
            f.ids.append(f.pending)
            f.mask.append(True)
            f.gen.append(f.pending)
            f.top1.append(int(top1[s]))
            f.taps.append(hs[s][None])
            f.pending = int(nxt[s])
            self.tokens_done += 1
            if len(f.ids) >= self.rc.max_len:
                self._end_turn(f, "max_len")
                self._finish(s)
            else:
                self._check_stop(s)

    # -- output ------------------------------------------------------------------------------------
    def _write_shard(self) -> None:
        if not self.buffer and not self.skipped:
            return
        fl = sorted(self.buffer, key=lambda f: f.index)
        si = len(self.m["shards"])
        tmp, final = self.out / f".shard_{si:05d}.tmp", self.out / f"shard_{si:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "tokens.npy", np.asarray([t for f in fl for t in f.ids], np.int32))
        np.save(tmp / "loss_mask.npy", np.asarray([x for f in fl for x in f.mask], bool))
        np.save(tmp / "offsets.npy", np.cumsum([0] + [len(f.ids) for f in fl]).astype(np.int64))
        np.save(tmp / "top1.npy", np.asarray([t for f in fl for t in f.top1], np.int32))
        np.save(tmp / "conv_index.npy", np.asarray([f.index for f in fl], np.int64))
        taps = np.concatenate([np.concatenate(f.taps) for f in fl]) if fl else None
        for k, tap in enumerate(self.taps):
            np.save(
                tmp / f"tap_{tap}.npy", taps[:, k] if fl else np.zeros((0, self.cfg.hidden_size), np.float16)
            )
        with (tmp / "conversations.jsonl").open("w", encoding="utf-8") as fh:
            for f in fl:
                fh.write(json.dumps(f.record()) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        now = time.perf_counter()
        shard = {"index": si, "name": final.name, "sequences": len(fl), "tokens": sum(len(f.ids) for f in fl),
                 "seconds": round(now - self.t_shard, 2)}  # fmt: skip
        self.t_shard = now
        self.m["shards"].append({**shard, "conversations": [f.index for f in fl], "skipped": self.skipped})
        _write_manifest(self.out, self.m)
        self.buffer, self.skipped = [], []

    def run(self, todo: list[int], bar) -> None:
        queue = collections.deque(todo)
        t0, n0 = time.perf_counter(), self.tokens_done
        last = t0
        while queue or any(f is not None for f in self.slots):
            reqs = [s for s, f in enumerate(self.slots) if f is not None and f.delta is not None]
            for s in range(self.rc.slots):
                while self.slots[s] is None and queue:
                    i = queue.popleft()
                    f = self.slots[s] = Flight(i, self.convs[i])
                    next_prompt(f, self.tok, self.tail, self.rc.max_len, first=True)
                    if f.last:  # nothing to answer
                        self._finish(s)
                    else:
                        reqs.append(s)
            if reqs:
                self._prefill(reqs)
            if any(f is not None and f.delta is None for f in self.slots):
                self._decode()
            done = sum(len(s["conversations"]) + len(s["skipped"]) for s in self.m["shards"])
            now = time.perf_counter()
            if now - last >= 2.0:  # the bar moves per conversation; tokens/s every 2 s
                rate = (self.tokens_done - n0) / max(now - t0, 1e-9)
                (ps, pn), (ds, dn) = self.clock["prefill"], self.clock["decode"]
                info = f"{rate:.0f} tok/s (prefill {pn / max(ps, 1e-9):.0f}, decode {dn / max(ds, 1e-9):.0f})"
                bar.set_postfix_str(f"{info}, {self.tokens_done / 1e6:.2f}M tok", refresh=False)
                bar.update(done + len(self.buffer) + len(self.skipped) - bar.n)
                bar.refresh()
                last = now
        self._write_shard()
        bar.update(bar.total - bar.n)


def regenerate(
    params,
    cfg: ModelConfig,
    source: str,
    tokenizer,
    convs: Sequence[Conversation],
    out_dir: os.PathLike,
    *,
    taps: tuple[int, ...],
    rc: RegenConfig | None = None,
    eos_ids: Sequence[int] | None = None,
    data: str = "",
    progress: bool = True,
    prefill: tuple | None = None,
    skip: Collection[int] = (),
    on_shard: Callable[[], None] | None = None,
    stop_after_shards: int | None = None,
) -> pathlib.Path:
    """Regenerate the assistant turns of `convs` with the target and cache its features in `out_dir`.

    Resumes an interrupted run (same conversations and settings); raises `FeatureCacheError` when
    `out_dir` holds another run. `eos_ids` default to the model's. `prefill` = (params, cfg) of the
    same target for the prefills, e.g. the scanned-layer layout: each prefill shape compiles in
    seconds instead of the unrolled model's tens of seconds, and decode steps keep the unrolled one
    (faster per step). `skip`: conversation indices regenerated elsewhere (an exported set's other
    parts, `regenerated_set.exported_indices`), left out of this run. `on_shard()` is called after
    every shard written (e.g. to re-export). `stop_after_shards` (tests) simulates a kill after that
    many new shards.
    """
    from tqdm.auto import tqdm

    rc = rc or RegenConfig()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = rc.sampling
    want = {
        "target": _target_id(source, cfg), "taps": list(taps), "num_examples": len(convs),
        "regenerated": {"data": str(data), "max_len": rc.max_len, "max_new_tokens": rc.max_new_tokens,
                        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": rc.seed,
                        "first_user": _fingerprint(convs)},
    }  # fmt: skip
    m = _read_manifest(out)
    if m is None:
        m = {**want, "dtype": "float16", "shards": [], "complete": False,
             "run_id": f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"}  # fmt: skip
        _write_manifest(out, m)
    elif any(m.get(k) != v for k, v in want.items()):
        diff = {k: (m.get(k), v) for k, v in want.items() if m.get(k) != v}
        raise FeatureCacheError(
            f"{out} holds a regeneration with other settings (cached vs requested: {diff}); "
            "use another --features folder or delete this one"
        )
    for d in out.glob(".shard_*.tmp"):  # a shard cut off by an interruption
        shutil.rmtree(d)
    done = {i for sh in m["shards"] for i in sh["conversations"] + sh["skipped"]}
    skip = set(skip) - done
    todo = [i for i in range(len(convs)) if i not in done and i not in skip]
    m["elsewhere"] = len(skip)  # in the export's other parts, not in this cache
    if stop_after_shards is not None:
        target = len(m["shards"]) + stop_after_shards
    eos = cfg.eos_token_ids if eos_ids is None else eos_ids
    run = _Run(params, cfg, tokenizer, convs, out, rc, taps, eos, m, prefill or (params, cfg))
    bar = tqdm(total=len(done) + len(todo), initial=len(done), desc="regenerate+features", unit="conv",
               disable=not progress, smoothing=0.05, mininterval=2.0)  # fmt: skip
    if on_shard is not None:
        on_shard()  # at once: an export refusing these settings fails before any work
    write = run._write_shard

    def write_then_report():
        n = len(m["shards"])
        write()
        if on_shard is not None and len(m["shards"]) > n:
            on_shard()
        if stop_after_shards is not None and len(m["shards"]) >= target:
            raise _Stop

    run._write_shard = write_then_report
    try:
        run.run(todo, bar)
    except _Stop:
        return out
    finally:
        bar.close()
    m["complete"] = True
    cost = m["regenerated"]
    cost["tokens"] = int(sum(sh["tokens"] for sh in m["shards"]))
    cost["seconds"] = round(sum(sh.get("seconds", 0.0) for sh in m["shards"]), 1)
    cost["tokens_per_s"] = round(cost["tokens"] / max(cost["seconds"], 1e-9), 1)
    cost["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    _write_manifest(out, m)
    if on_shard is not None:
        on_shard()
    return out


class _Stop(Exception):
    pass


def _fingerprint(convs: Sequence[Conversation]) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in convs:
        h.update(next((m["content"] for m in c if m["role"] == "user"), "").encode() + b"\0")
    return h.hexdigest()[:16]
