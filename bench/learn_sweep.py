"""Recipe sweep for ShapesWorld learnability (issue #9): many small LightGen runs in parallel.

Each *spec* (a JSON object) is one training run: ModelConfig overrides of a preset, the optimiser
recipe (batch, lr, warm-up, schedule, EMA), the data (captions, images per caption, canvas, world
tweaks) and the evaluation (held-out canonical prompts scored by the ShapesWorld scorer, at given
numbers of training images). Text states come precomputed from bench/learn_textcache.py, so this runs
where neither transformers nor the MiniLM package is installed.

    python bench/learn_sweep.py worker --specs runs/learn2/specs.json --queue gpu --device cuda --out /tmp/sweep
    python bench/learn_sweep.py one --spec '{"name": "t", "batch": 16, "images": 2000}' --device cpu

Workers of one queue claim specs first come first served (a claim file per spec), so any number of
worker processes share a queue. Every evaluation is one JSON line in <out>/<worker>.jsonl. A spec with
"seconds" is a throughput probe: it trains that long after a warm-up and reports img/s, no evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightgen_model import LightGen, generate, preset  # noqa: E402
from shapesworld import ShapesTeacher, generate_prompts, score_image  # noqa: E402

DEFAULTS = {
    "preset": "shapes", "set": {}, "batch": 64, "lr": 1e-3, "warmup": 200, "sched": "const", "min_lr": 0.0,
    "wd": 0.0, "beta2": 0.95, "ema": 0.0, "pos": "learned", "n_train": 6000, "k_img": 1, "res": None,
    "canon_frac": 0.0, "world": {}, "images": 200_000, "seconds": None, "eval_at": [50_000, 100_000, 150_000],
    "n_eval": 120, "final_n_eval": 360, "sampling": [[64, 0.5, 3.0, "linear"]], "final_sampling": None,
    "seed": 0, "grid": True,
}  # fmt: skip


# -- text states ---------------------------------------------------------------------------------------
class TextCache:
    def __init__(self, path: str):
        z = np.load(path)
        self.train_recs = json.loads(str(z["train_json"]))
        self.canon_recs = json.loads(str(z["canon_json"]))
        self.train = self._unpack(z, "train")
        self.canon = self._unpack(z, "canon")
        self.canon_index = {r["prompt"]: i for i, r in enumerate(self.canon_recs)}

    @staticmethod
    def _unpack(z, key):
        q, s, off = z[f"{key}_q"], z[f"{key}_scale"].astype(np.float32), z[f"{key}_off"]
        x = q.astype(np.float32) * s
        return [x[off[i] : off[i + 1]] for i in range(len(off) - 1)]


def pad_states(states: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in states)
    out = np.zeros((len(states), L, states[0].shape[1]), np.float32)
    mask = np.zeros((len(states), L), bool)
    for i, s in enumerate(states):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


# -- world tweaks (bench only: monkeypatched render constants) -------------------------------------------
_ORIG: dict = {}


def apply_world(world: dict) -> None:
    from shapesworld import render

    _ORIG.setdefault("SIZE_RANGES", render.SIZE_RANGES)
    _ORIG.setdefault("_background", render._background)
    render.SIZE_RANGES, render._background = _ORIG["SIZE_RANGES"], _ORIG["_background"]
    if "size_ranges" in world:
        render.SIZE_RANGES = {int(k): tuple(v) for k, v in world["size_ranges"].items()}
    if world.get("flat_bg"):

        def flat(rng, res):  # same draws as the original, no gradient or noise
            base = rng.uniform(212, 238) + rng.uniform(-4, 4, size=3)
            rng.uniform(0, 2 * np.pi), rng.uniform(6, 14)
            rng.normal(0, 1.5, size=(res, res, 3))
            return np.broadcast_to(base.astype(np.float32), (res, res, 3)).copy()

        render._background = flat


def build_data(spec: dict, tc: TextCache, res: int):
    n, k = spec["n_train"], spec["k_img"]
    recs = [dict(r, include=[dict(e) for e in r["include"]]) for r in tc.train_recs[:n]]
    rng = np.random.default_rng(12345)
    states = []
    for i, r in enumerate(recs):
        if rng.random() < spec["canon_frac"]:
            for e in r["include"]:
                e.pop("size", None)
            states.append(tc.canon[tc.canon_index[r["prompt"]]])
        else:
            states.append(tc.train[i])
    apply_world(spec["world"])
    teacher = ShapesTeacher(res)
    metas = [r for r in recs for _ in range(k)]
    seeds = [1_000_003 * (j + 1) + 7 * i for i in range(n) for j in range(k)]
    imgs = teacher.batch(metas, seeds)  # (N*k, H, W, 3) uint8
    text, mask = pad_states(states)
    owner = torch.arange(n).repeat_interleave(k)  # image -> caption
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), owner, text, mask


# -- model helpers ---------------------------------------------------------------------------------------
def sincos_2d(D: int, g: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table (g*g, D)."""

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64), indexing="ij")
    return torch.from_numpy(np.concatenate([one(D // 2, gy), one(D // 2, gx)], axis=1)).float()


def init_pos(model: LightGen, how: str) -> None:
    if how == "learned":
        return
    g = model.cfg.base_grid[0]
    with torch.no_grad():
        for t in (model.encoder_pos_embed_learned, model.decoder_pos_embed_learned, model.last_pos_embed_learned):
            t.copy_(sincos_2d(t.shape[-1], g)[None] * (0.5 if how == "sincos_half" else 1.0))


def lr_at(spec: dict, step: int, total: int) -> float:
    w = spec["warmup"]
    f = min(1.0, (step + 1) / w)
    if spec["sched"] != "const" and step >= w:
        p = min(1.0, (step - w) / max(1, total - w))
        m = spec["min_lr"]
        f *= m + (1 - m) * (0.5 * (1 + math.cos(math.pi * p)) if spec["sched"] == "cos" else 1 - p)
    return spec["lr"] * f


@torch.no_grad()
def evaluate(model, erecs, etext, emask, samplings, dev, grid_path=None) -> dict:
    model.eval()
    out = {}
    for s in samplings:
        num_iter, temp, cfg = s[0], s[1], s[2]
        sched = s[3] if len(s) > 3 else "linear"
        g = torch.Generator(device=dev).manual_seed(1234)
        imgs_all = []
        chunk = len(erecs) if dev.type == "cuda" else 64
        for i in range(0, len(erecs), chunk):
            sl = slice(i, i + chunk)
            Lt = int(emask[sl].sum(1).max())
            lat = generate(model, etext[sl, :Lt], emask[sl, :Lt], num_iter=num_iter, cfg=cfg, cfg_schedule=sched,
                           temperature=temp, generator=g)  # fmt: skip
            imgs_all.append(((lat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        imgs = np.concatenate(imgs_all)
        per = defaultdict(list)
        for rec, img in zip(erecs, imgs, strict=True):
            per[rec["tag"]].append(bool(score_image(img, rec).correct))
        acc = {k: round(float(np.mean(v)), 3) for k, v in per.items()}
        acc["overall"] = round(float(np.mean(list(acc.values()))), 4)
        key = f"i{num_iter}_t{temp}_c{cfg}_{sched[:3]}"
        out[key] = acc
        if grid_path and s is samplings[0]:
            save_grid(imgs[:48], grid_path)
    model.train()
    return out


def save_grid(imgs: np.ndarray, path: str, cols: int = 8) -> None:
    from PIL import Image

    n, h, w, _ = imgs.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, im in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


# -- one run ---------------------------------------------------------------------------------------------
def run_spec(spec: dict, tc: TextCache, dev: torch.device, emit, outdir: Path) -> None:
    spec = {**DEFAULTS, **spec}
    torch.manual_seed(spec["seed"])
    cfg = preset(spec["preset"], **spec["set"])
    res = spec["res"] or cfg.base_resolution
    if res != cfg.base_resolution:
        cfg = cfg.replace(base_resolution=res)
    t0 = time.time()
    imgs, owner, text, mask = build_data(spec, tc, res)
    erecs = generate_prompts(max(spec["n_eval"], spec["final_n_eval"]), seed=999_001, diversity=0.0)
    etext, emask = pad_states([tc.canon[tc.canon_index[r["prompt"]]] for r in erecs])
    imgs, owner, text, mask, etext, emask = (t.to(dev) for t in (imgs, owner, text, mask, etext, emask))
    setup_s = time.time() - t0
    model = LightGen(cfg).to(dev).train()
    init_pos(model, spec["pos"])
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "diffloss" not in n and "pos_embed" not in n]
    rest = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "diffloss" not in n and "pos_embed" not in n)
    ]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["wd"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=spec["lr"], betas=(0.9, spec["beta2"]))  # fmt: skip
    ema = None
    if spec["ema"]:
        ema = LightGen(cfg).to(dev).eval()
        ema.load_state_dict(model.state_dict())
    B = spec["batch"]
    total = spec["images"] // B
    g = torch.Generator(device=dev).manual_seed(spec["seed"])
    evals = sorted(set([e for e in spec["eval_at"] if e < spec["images"]] + [spec["images"]]))
    seen, step, train_s = 0, 0, 0.0
    loss_sum, loss_n = torch.zeros((), device=dev), 0
    base = {"name": spec["name"], "device": dev.type, "threads": torch.get_num_threads(), "params": n_params}
    emit(base | {"event": "start", "setup_s": round(setup_s, 1), "spec": spec})
    warm_steps = 10
    tw = None
    while True:
        if spec["seconds"] is not None and step == warm_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            tw, seen_w = time.time(), seen
        ts = time.time()
        idx = torch.randint(0, imgs.shape[0], (B,), device=dev, generator=g)
        cap = owner[idx]
        Lt = int(mask[cap].sum(1).max())
        lat = imgs[idx].float() / 127.5 - 1
        for grp in opt.param_groups:
            grp["lr"] = lr_at(spec, step, total)
        loss = model(lat, text[cap, :Lt], mask[cap, :Lt])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                d = min(spec["ema"], (1 + step) / (10 + step))
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        loss_sum += loss.detach()
        loss_n += 1
        train_s += time.time() - ts
        seen += B
        step += 1
        if spec["seconds"] is not None:
            if tw is not None and time.time() - tw >= spec["seconds"]:
                ips = (seen - seen_w) / (time.time() - tw)
                emit(base | {"event": "throughput", "img_per_s": round(ips, 1), "steps_per_s": round(ips / B, 2),
                             "loss": round(float(loss_sum) / loss_n, 4), "batch": B})  # fmt: skip
                return
            continue
        if evals and seen >= evals[0]:
            final = seen >= spec["images"]
            erecs_n = spec["final_n_eval"] if final else spec["n_eval"]
            samplings = (spec["final_sampling"] or spec["sampling"]) if final else spec["sampling"]
            te = time.time()
            m = ema if ema is not None else model
            gp = str(outdir / f"{spec['name']}_{seen // 1000}k.png") if (final and spec["grid"]) else None
            ev = evaluate(m, erecs[:erecs_n], etext[:erecs_n], emask[:erecs_n], samplings, dev, gp)
            if ema is not None and final:
                ev.update(
                    {
                        f"raw_{k}": v
                        for k, v in evaluate(
                            model, erecs[:erecs_n], etext[:erecs_n], emask[:erecs_n], samplings[:1], dev
                        ).items()
                    }
                )
            emit(base | {"event": "eval", "images": seen, "steps": step, "train_s": round(train_s, 1),
                         "img_per_s": round(seen / train_s, 1), "eval_s": round(time.time() - te, 1),
                         "loss": round(float(loss_sum) / loss_n, 4), "n_eval": erecs_n, "scores": ev})  # fmt: skip
            loss_sum, loss_n = torch.zeros((), device=dev), 0
            evals.pop(0)
            if final or not math.isfinite(float(loss.detach())):
                return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["worker", "one"])
    p.add_argument("--specs", help="JSON file: {queue: [spec, ...]}")
    p.add_argument("--queue")
    p.add_argument("--spec", help="one spec as JSON (mode one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text", default="runs/learn2/text.npz")
    p.add_argument("--out", default="runs/learn2/sweep")
    p.add_argument("--worker-id", default=str(os.getpid()))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{args.queue or 'one'}_{args.worker_id}.jsonl", "a")  # noqa: SIM115

    def emit(row: dict) -> None:
        row = {"t": round(time.time(), 1), "worker": args.worker_id} | row
        line = json.dumps(row)
        log.write(line + "\n")
        log.flush()
        print(line if row.get("event") != "start" else line[:300], flush=True)

    tc = TextCache(args.text)
    if args.mode == "one":
        run_spec(json.loads(args.spec), tc, dev, emit, out)
        return
    specs = json.loads(Path(args.specs).read_text())[args.queue]
    claims = out / "claims"
    claims.mkdir(exist_ok=True)
    for spec in specs:
        try:
            os.close(os.open(claims / f"{args.queue}_{spec['name']}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        try:
            run_spec(spec, tc, dev, emit, out)
        except Exception as e:  # keep the worker going
            emit({"event": "error", "name": spec["name"], "error": repr(e)[:500]})


if __name__ == "__main__":
    main()
