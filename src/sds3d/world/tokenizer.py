"""A CLIP tokenizer for the synthetic world's vocabulary, written as the standard CLIP files
(vocab.json, merges.txt) so that `transformers.CLIPTokenizer.from_pretrained` loads it like any
hub tokenizer. Every word of every world prompt (colours, shapes, view suffixes) is one token.

BPE as in CLIP: a word is split into characters, the last marked with "</w>", and merges join
adjacent pieces in rank order. The merges are built by running that loop on each world word and
adding merges until the word is one token, so no world word ever falls back to characters.
"""

from __future__ import annotations

import json
from pathlib import Path

from sds3d.prompts import VIEW_SUFFIXES
from sds3d.world.shapes import COLORS, SHAPES

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# New words go last: merges rank in this order, so earlier words keep their tokens ("with": world v2's
# "a blue cube with a red front"; "front" is a view suffix's word).
WORDS = ("a", "an", "view", *COLORS, *SHAPES, *VIEW_SUFFIXES, "with")
# Single characters (plain and word-final) keep any other text tokenisable, as unknown-free pieces.
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"


def _pieces(word: str) -> list[str]:
    return [*word[:-1], word[-1] + "</w>"]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE loop: merge the lowest-ranked adjacent pair until none is known."""
    while len(pieces) > 1:
        pairs = [
            (ranks.get((a, b), len(ranks) + 1), i)
            for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def write_world_tokenizer(out_dir: Path | str, model_max_length: int = 16) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `out_dir`; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in [*CHARS, *(c + "</w>" for c in CHARS)]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        # Run BPE with the merges so far; while the word is not one token, add a merge for its
        # first pair. New merges rank last, so earlier words still tokenise as before.
        while len(pieces := _bpe(_pieces(word), ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    for token in SPECIAL:
        vocab[token] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1],
        "do_lower_case": True,
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1],
        "unk_token": SPECIAL[1],
        "pad_token": SPECIAL[1],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return out
