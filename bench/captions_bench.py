"""`build-captions` benchmark: near-duplicate recall / false removals on a planted set, and the scale run.

Planted set: distinct captions from a text-to-image prompt generator (27 templates, 3-45 words, multi-word slot
fillers drawn from ~1,000 phrases, optional clauses) plus ShapesWorld captions with their GenEval metadata; then
one-word edits (a word substituted by a random vocabulary word, a random word inserted, a word deleted, or two
adjacent different words swapped: one edit too) of a random subset, placed after all originals. Recall = planted
edits removed as duplicates, per edit kind and caption length; false removal = distinct captions removed as near
duplicates (the report also says by which rule each went: one word changed, inserted / deleted or two words swapped
from the distinct caption kept in its place, the generator's own near duplicates, or Jaccard). Every run of
`CaptionsStage.run` selects everything (`--n` = inputs), so only de-duplication removes captions.

Scale: N inputs (generator captions + 8 % exact copies with case / punctuation changes + 4 % one-word edits + bad
rows) in 4 JSONL and 4 Parquet files; `lightgen-data build-captions --embedder hash` timed under /usr/bin/time -v
(max RSS); with Ray the RSS of all processes is sampled from /proc.

    python bench/captions_bench.py planted --distinct 200000 --shapes 20000 --edits 20000 --edit-words 0:0,8:8,8:14
    python bench/captions_bench.py scale --rows 100000,1000000,2000000 --workers 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages.captions.build import CaptionsConfig, CaptionsStage
from pipeline.stages.captions.diversity import dedup_key

_L = lambda s: [w.strip() for w in s.split(",") if w.strip()]
COLORS = _L(
    "red, blue, green, yellow, orange, purple, pink, black, white, grey, brown, golden, silver, teal, crimson, "
    "turquoise, beige, navy blue, emerald green, pastel pink, deep purple, rusty orange, pale yellow, ivory"
)
ADJ = _L(
    "small, large, tiny, huge, old, young, ancient, modern, shiny, rusty, fluffy, wooden, glass, metal, stone, "
    "ceramic, plastic, vintage, futuristic, colorful, weathered, elegant, cozy, majestic, abandoned, mysterious, "
    "playful, sleepy, curious, happy, angry, lonely, giant, miniature, ornate, minimalist, glowing, frozen, "
    "muddy, broken, brand new, hand-painted, knitted, polished, dusty, translucent, fuzzy, striped, spotted"
)
NOUNS = _L(
    "cat, dog, fox, owl, horse, elephant, tiger, lion, rabbit, squirrel, bear, wolf, deer, parrot, penguin, "
    "dolphin, whale, turtle, frog, butterfly, bee, dragon, unicorn, robot, astronaut, knight, wizard, pirate, "
    "samurai, ballerina, chef, farmer, fisherman, old man, little girl, young woman, boy, teenager, grandmother, "
    "musician, painter, soldier, monk, clown, detective, scientist, car, bicycle, motorcycle, train, airplane, "
    "sailboat, hot air balloon, lighthouse, castle, cottage, skyscraper, bridge, windmill, tent, treehouse, "
    "teapot, coffee cup, vase of flowers, bowl of fruit, stack of books, guitar, piano, violin, typewriter, "
    "camera, lantern, clock, chair, sofa, bed, umbrella, backpack, hat, pair of shoes, teddy bear, kite, "
    "cupcake, pizza, sandwich, burger, bowl of ramen, sushi platter, apple, banana, pumpkin, mushroom, cactus, "
    "sunflower, rose, oak tree, palm tree, waterfall, volcano, mountain, river, lake, island, spaceship, "
    "submarine, tractor, bus, taxi, fire truck, helicopter, snowman, scarecrow, statue, fountain, mailbox"
)
VERBS = _L(
    "sitting, standing, sleeping, running, jumping, dancing, reading a book, playing chess, eating breakfast, "
    "drinking tea, looking at the stars, walking, flying, swimming, resting, waiting, singing, painting a "
    "picture, fishing, riding a bicycle, climbing a tree, playing the guitar, hiding, smiling, laughing, "
    "crying, thinking, watching the sunset, holding an umbrella, carrying a basket, wearing a red scarf, "
    "wearing sunglasses, wearing a crown, looking out of a window, taking a photo, building a sandcastle"
)
PLACES = _L(
    "on a beach, in a forest, in a desert, on a mountain top, in a city street, in a kitchen, in a library, "
    "in a garden, on a rooftop, in a field of flowers, under the sea, in outer space, on the moon, in a snowy "
    "village, in a rainy alley, in a cozy living room, in a museum, at a train station, in a market, on a "
    "farm, in a classroom, in a cathedral, on a pirate ship, in a cave, on a frozen lake, in a jungle, in a "
    "swamp, on a bridge, in a subway car, at a cafe, in a park, by a river, next to a campfire, in a bakery, "
    "in a greenhouse, on a balcony, in an abandoned factory, in a neon-lit arcade, in a medieval tavern, "
    "on a wooden table, on a kitchen counter, on a windowsill, in a bathtub, on a chessboard, in a toy store"
)
TIMES = _L(
    "at sunset, at sunrise, at night, at dawn, at dusk, in the morning, at noon, during a storm, in the rain, "
    "in the snow, in the fog, under a full moon, on a summer afternoon, in autumn, in winter, in spring, "
    "during golden hour, under a starry sky, on a cloudy day, during a thunderstorm"
)
STYLES = _L(
    "oil painting, watercolor, digital art, pencil sketch, charcoal drawing, 3d render, pixel art, anime "
    "style, studio ghibli style, cyberpunk style, steampunk style, art nouveau, impressionist painting, "
    "ukiyo-e woodblock print, claymation, low poly, vaporwave, pop art, comic book style, children's book "
    "illustration, concept art, matte painting, photorealistic, cinematic still, polaroid photo, 35mm film "
    "photo, macro photograph, aerial photograph, black and white photo, long exposure photograph, isometric "
    "illustration, flat vector illustration, stained glass, mosaic, origami, paper cut art, embroidery"
)
LIGHT = _L(
    "soft lighting, dramatic lighting, volumetric lighting, neon lighting, warm light, cold blue light, "
    "backlit, rim lighting, candlelight, studio lighting, natural light, moody shadows, god rays, bokeh, "
    "high contrast, low key lighting, golden light, diffuse light, harsh sunlight, glowing lanterns"
)
QUALITY = _L(
    "highly detailed, 4k, 8k, sharp focus, trending on artstation, award winning, intricate details, "
    "ultra realistic, masterpiece, wide angle, shallow depth of field, symmetrical composition, "
    "hyperrealistic, octane render, unreal engine, vibrant colors, muted colors, pastel colors, "
    "film grain, depth of field"
)
EXTRAS = _L(
    "with mountains in the background, surrounded by flowers, next to a small dog, with a rainbow in the sky, "
    "with birds flying overhead, covered in snow, reflected in a puddle, with fireflies around, with a city "
    "skyline behind, surrounded by fog, with autumn leaves falling, next to an old bicycle, with a full moon "
    "behind, with colorful balloons, surrounded by candles, with vines growing on it, with a river flowing "
    "nearby, under a cherry blossom tree, beside a red door, with stars reflected in the water"
)
ARTISTS = _L(
    "van gogh, monet, hokusai, rembrandt, klimt, mucha, dali, vermeer, turner, hopper, magritte, "
    "picasso, cezanne, degas, renoir, caravaggio, kandinsky, miyazaki, moebius, greg rutkowski"
)
TEMPLATES = [
    "a {c} {n}",
    "a {a} {n}",
    "{n} {p}",
    "a photo of a {a} {n}",
    "a {a} {c} {n} {p}",
    "a {a} {n} {v} {p}",
    "a {n} {v} {p} {t}",
    "a {a} {n} {v} {p}, {s}",
    "{s} of a {a} {c} {n} {v} {p} {t}",
    "a {a} {n} {v} {p} {t}, {x}, {s}, {l}",
    "an {s} of a {n} {v} {p}, {l}, {q}",
    "portrait of a {a} {n} {v}, {s}, {l}, {q}, {q2}",
    "a {c} {n} and a {a} {n2} {p} {t}",
    "{s} of a {a} {n} {x}, by {r}, {l}, {q}",
    "a close-up of a {a} {c} {n} {v}, {q}",
    "a {a} {n} {v} {p} {x} {t}, {s}, {l}, {q}, {q2}",
    "a wide shot of a {n} {v} {p}, {x}, {t}, {s} in the style of {r}, {l}, {q}, {q2}",
    "there is a {a} {n} {p}",
    "two {n}s {v} {p} {t}",
    "a {a} {n} made of {m} {p}, {s}",
    "a {c} {n} {x}",
    "an illustration of a {a} {n} {v}, {s}",
    "a {a} {c} {n} {v} {p} {t} {x}",
    "a cute {n} {v} {p}, {s}, {q}",
    "the {a} {n} is {v} {p} while a {a2} {n2} is {v2} {t}",
    "a {a} {n} {v} {p} {t}, {x}, {s} by {r} and {r2}, {l}, {q}, {q2}, {q3}",
    "a {n} {v}",
]
NOUNS += _L(
    "person, truck, boat, traffic light, fire hydrant, stop sign, parking meter, bench, bird, sheep, cow, "
    "zebra, giraffe, handbag, tie, suitcase, frisbee, snowboard, skateboard, surfboard, tennis racket, bottle, "
    "wine glass, fork, knife, spoon, bowl, sandwich, broccoli, carrot, hot dog, donut, cake, couch, potted "
    "plant, dining table, toilet, television, laptop, cell phone, microwave, oven, toaster, sink, refrigerator, "
    "book, vase, scissors, toothbrush, goat, pig, chicken, duck, swan, flamingo, peacock, hedgehog, raccoon, "
    "otter, koala, panda, sloth, kangaroo, camel, llama, octopus, jellyfish, crab, seahorse, shark, goldfish, "
    "beetle, ladybug, snail, lizard, chameleon, snake, crocodile, gorilla, monkey, lemur, badger, moose, bison, "
    "firefighter, nurse, doctor, librarian, gardener, mechanic, photographer, sailor, cowboy, ninja, viking, "
    "mermaid, fairy, goblin, vampire, ghost, witch, princess, king, queen, jester, surfer, skier, hiker, "
    "gondola, canoe, yacht, tram, rocket, satellite, hovercraft, zeppelin, carousel, ferris wheel, pagoda, "
    "temple, igloo, barn, greenhouse, observatory, clock tower, water tower, telescope, microscope, compass, "
    "globe, map, candle, chandelier, mirror, bookshelf, armchair, rocking chair, hammock, bathtub, record "
    "player, radio, jukebox, accordion, trumpet, saxophone, drum kit, harp, cello, flute, banjo, croissant, "
    "bagel, pancake stack, waffle, ice cream cone, popsicle, lemon, watermelon, pineapple, strawberry, cherry, "
    "grapes, avocado, tomato, eggplant, bonsai tree, tulip, orchid, lily, lotus flower, maple tree, pine tree, "
    "willow tree, birch forest, bamboo grove, glacier, canyon, geyser, sand dune, coral reef, meadow"
)
ADJ += _L(
    "enormous, petite, chubby, skinny, furry, feathered, scaly, slimy, sparkling, dazzling, faded, crumbling, "
    "gleaming, velvet, leather, porcelain, bronze, golden, neon, holographic, inflatable, mechanical, "
    "clockwork, steam-powered, solar-powered, haunted, enchanted, magical, cursed, friendly, grumpy, shy, "
    "brave, proud, fierce, gentle, graceful, clumsy, lazy, energetic, tired, hungry, thirsty, wet, dry, "
    "fluffy white, patchwork, crocheted, origami, paper, cardboard, rubber, felt, tin, iron, jade, obsidian"
)
EXTRAS += _L(
    "with a lantern in the window, under a striped umbrella, beside a stack of old books, on a checkered "
    "blanket, among tall grass, in front of a brick wall, with smoke rising from the chimney, surrounded by "
    "butterflies, next to a sleeping cat, with a kite in the sky, under a bridge, near a lighthouse, with "
    "paper lanterns hanging above, beside a wooden fence, with a waterfall behind, among cherry blossoms, "
    "with a sailboat on the horizon, with a hot air balloon above, beside a vintage car, with a full shelf "
    "of plants, next to a crackling fireplace, under a glowing streetlamp, with a red ribbon, with a "
    "crown of flowers, wrapped in a scarf, holding a small lantern, with a tiny hat, wearing a raincoat, "
    "with bubbles floating around, with snowflakes falling, on a mossy rock, in a glass jar, on a stack "
    "of pancakes, inside a snow globe, on a floating island, next to a giant mushroom, among the clouds, "
    "in a field of lavender, under northern lights, beside a quiet pond, near a busy market stall"
)
PLACES += _L(
    "in a bamboo forest, on a sailboat, in a hot spring, at a carnival, in a tea house, in a laboratory, "
    "in a spaceship cockpit, on a train platform, in a treehouse, in a barn, on a golf course, in a "
    "vineyard, on a snowy mountain pass, in a canyon, at a lighthouse, on a cliff edge, in a sunflower "
    "field, in a flower shop, in a record store, in a bookshop, in a concert hall, on a stage, in a boxing "
    "ring, at the bottom of the ocean, on a tropical island, in a rice paddy, in an orchard, in a hallway, "
    "in an attic, in a basement, in a castle courtyard, in a throne room, at an airport, in a parking lot"
)
MATERIALS = _L("glass, clay, paper, wood, gold, ice, chocolate, lego bricks, yarn, crystal, marble, copper wire")
VOCAB = sorted(
    {
        w
        for lst in (COLORS, ADJ, NOUNS, VERBS, PLACES, TIMES, STYLES, LIGHT, QUALITY, EXTRAS)
        for phrase in lst
        for w in phrase.split()
    }
)


def caption(rng: random.Random) -> str:
    """One generated text-to-image prompt."""
    slots = _slots(rng, "c a n n2 v v2 p t s l q q2 q3 x r r2 a2 m")
    text = rng.choice(TEMPLATES).format(**slots)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


MOODS = _L(
    "calm, peaceful, mysterious, joyful, melancholic, eerie, dreamy, nostalgic, tense, cheerful, romantic, "
    "somber, whimsical, serene, chaotic, festive, lonely, cozy, ominous, playful, majestic, quiet, lively"
)
OPENERS = _L(
    "The image shows, The picture depicts, This photograph captures, The illustration features, In this image "
    "we see, The scene presents, This artwork portrays, The painting shows, A detailed view of"
)
SENTENCES = [
    "In the background, there is {bg} {t}.",
    "The {n} is {v} {x}.",
    "The scene is lit by {l}, creating a {mood} atmosphere.",
    "The colors are dominated by {c} and {c2} tones.",
    "The style resembles {s}, {q}.",
    "Next to it, a {a2} {n2} is {v2}.",
    "The overall mood of the image is {mood} and {mood2}.",
    "The composition is {q} with {l}.",
    "On the left side, a {c} {n2} stands {p2}.",
    "The ground is covered with {m} and {c2} leaves.",
]

# the phrase list of each caption slot; a trailing 2 or 3 names a second or third draw from the same list
SLOT_LISTS = {
    "c": COLORS,
    "a": ADJ,
    "n": NOUNS,
    "v": VERBS,
    "p": PLACES,
    "t": TIMES,
    "s": STYLES,
    "l": LIGHT,
    "q": QUALITY,
    "x": EXTRAS,
    "r": ARTISTS,
    "m": MATERIALS,
    "bg": NOUNS,
    "mood": MOODS,
}


def _slots(rng: random.Random, names: str) -> dict[str, str]:
    """One random phrase per slot of `names`, drawn in that order."""
    return {k: rng.choice(SLOT_LISTS[k.rstrip("23")]) for k in names.split()}


def dense_caption(rng: random.Random) -> str:
    """A long descriptive caption like those of captioning datasets (the paper's caption source): 15-80 words."""
    slots = _slots(rng, "c c2 a a2 n n2 v v2 p p2 t s l q x bg mood mood2 m")
    slots["bg"] = "a " + slots["bg"]
    first = f"{rng.choice(OPENERS)} a {slots['a']} {slots['c']} {slots['n']} {slots['v']} {slots['p']}."
    rest = [t.format(**slots) for t in rng.sample(SENTENCES, rng.randint(1, 6))]
    return re.sub(r"\ba ([aeiou])", r"an \1", " ".join([first, *rest]))


def sample_caption(rng: random.Random, dense_share: float) -> str:
    """A long descriptive caption with probability `dense_share`, else a text-to-image prompt."""
    return dense_caption(rng) if rng.random() < dense_share else caption(rng)


EDIT_KINDS = ("substitute", "insert", "delete", "transpose")


def one_word_edit(text: str, rng: random.Random) -> tuple[str, str]:
    """A random one-word edit: (edited text, kind in substitute / insert / delete / transpose)."""
    words = text.split()
    swappable = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    kinds = ["substitute", "insert"] + ["delete"] * (len(words) > 2) + ["transpose"] * bool(swappable)
    kind = rng.choice(kinds)
    i = rng.randrange(len(words))
    if kind == "transpose":  # two adjacent, different words swapped
        i = rng.choice(swappable)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == "substitute":
        words[i] = rng.choice([w for w in rng.sample(VOCAB, 3) if w != words[i].strip(",")] or ["zebra"])
    elif kind == "insert":
        words.insert(rng.randrange(len(words) + 1), rng.choice(VOCAB))
    else:
        del words[i]
    return " ".join(words), kind


# ------------------------------------------------------------------------------------------------- planted set


def planted_set(root: Path, distinct: int, shapes: int, edits: int, seed: int, dense_share: float) -> Path:
    """JSONL of distinct generator + ShapesWorld captions, then one-word edits of a random subset of them.

    Each row has `caption`, `kind` (distinct / substitute / insert / delete / transpose), `of` (the edited row) and
    the ShapesWorld metadata (which edits keep: an edit describes the same scene)."""
    from shapesworld.world import generate_prompts

    rng, rows, seen = random.Random(seed), [], set()
    for rec in generate_prompts(shapes, seed):
        if dedup_key(rec["caption"]) not in seen:
            seen.add(dedup_key(rec["caption"]))
            rows.append(
                {
                    "caption": rec["caption"],
                    "kind": "distinct",
                    "metadata": {k: v for k, v in rec.items() if k != "caption"},
                }
            )
    n_shapes = len(rows)
    while len(rows) < n_shapes + distinct:
        text = sample_caption(rng, dense_share)
        if dedup_key(text) not in seen:
            seen.add(dedup_key(text))
            rows.append({"caption": text, "kind": "distinct"})
    originals = rng.sample(range(len(rows)), edits)
    for i in originals:
        text, kind = one_word_edit(rows[i]["caption"], rng)
        if dedup_key(text) not in seen:  # an edit that lands on another distinct caption is not a planted dup
            seen.add(dedup_key(text))
            rows.append(
                {
                    "caption": text,
                    "kind": kind,
                    "of": i,
                    **({"metadata": rows[i]["metadata"]} if "metadata" in rows[i] else {}),
                }
            )
    path = root / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score_planted(path: Path, out: Path, **kw) -> dict:
    """Run build-captions on the planted set; recall by edit kind and length, false removals and their cause."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    cfg = CaptionsConfig([str(path)], str(out), n=len(rows), embedder="hash", clusters=8, overwrite=True, **kw)
    t0 = time.perf_counter()
    report = CaptionsStage.run(cfg)
    seconds = time.perf_counter() - t0
    rej = pq.read_table(out / "rejects.parquet").to_pylist()
    removed = {int(r["source"].rsplit(":", 1)[1]) - 1: r for r in rej if r["reason"] in ("near_dup", "exact_dup")}
    by_id = {r["id"]: r for r in pq.read_table(out / "part-00000.parquet").to_pylist()}
    edits = [i for i, r in enumerate(rows) if r["kind"] != "distinct"]
    distinct = [i for i, r in enumerate(rows) if r["kind"] == "distinct"]
    n_words = lambda i: len(dedup_key(rows[i]["caption"]).split())
    groups = {
        "all": edits,
        "<=10 words": [i for i in edits if n_words(i) <= 10],
        ">10 words": [i for i in edits if n_words(i) > 10],
    }
    groups |= {k: [i for i in edits if rows[i]["kind"] == k] for k in EDIT_KINDS}
    groups |= {
        f"{k} {w}": [i for i in groups[k] if (n_words(i) <= 10) == (w == "<=10 words")]
        for k in EDIT_KINDS
        for w in ("<=10 words", ">10 words")
    }
    groups |= {"shapes": [i for i in edits if "metadata" in rows[i]]}
    recall = {
        k: {"n": len(v), "recall": round(sum(i in removed for i in v) / max(1, len(v)), 4)} for k, v in groups.items()
    }
    false = [i for i in distinct if i in removed]
    causes: dict[str, int] = {}
    for i in false:  # why: one word from the caption kept in its place (changed / inserted-deleted), or Jaccard
        kept = by_id.get(removed[i]["detail"][2:19])
        a, b = dedup_key(rows[i]["caption"]).split(), dedup_key(kept["caption"] if kept else "").split()
        apart = kept and "one word apart" in removed[i]["detail"]  # the pipeline's own word edit distance
        cause = ("changed" if len(a) == len(b) else "inserted/deleted") if apart else "jaccard"
        cause = "swapped" if kept and "two words swapped" in removed[i]["detail"] else cause
        cause = ("shapes same scene: " if "metadata" in rows[i] else "generator: ") + cause
        causes[cause] = causes.get(cause, 0) + 1
    generator = [i for i in distinct if "metadata" not in rows[i]]
    false_gen = sum(1 for i in false if "metadata" not in rows[i])
    return {
        "settings": kw,
        "inputs": len(rows),
        "distinct": len(distinct),
        "edits": len(edits),
        "recall": recall,
        "false_removed": len(false),
        "false_removal_rate": round(len(false) / len(distinct), 5),
        "false_removal_rate_generator": round(false_gen / max(1, len(generator)), 5),
        "false_causes": causes,
        "seconds": round(seconds, 1),
        "near_dup": report.get("near_dup"),
        "removed_by_reason": report["removed_by_reason"],
    }


# ------------------------------------------------------------------------------------------------------- scale


def scale_inputs(root: Path, rows: int, seed: int, dense_share: float) -> list[Path]:
    """`rows` inputs in 4 JSONL + 4 Parquet files: generator captions, 8 % exact copies (case / punctuation
    changed), 4 % one-word edits, and per JSONL file a bad line, a non-UTF-8 line and a row without the field."""
    done = sorted(root.glob("inputs-*")) if root.is_dir() else []
    if len(done) == 8:  # made by an earlier run with the same arguments
        return done
    rng = random.Random(seed)
    caps: list[str] = []
    for _ in range(rows):
        r = rng.random()
        if r < 0.08 and caps:
            caps.append(rng.choice(caps[-50_000:]).upper() + "!")
        elif r < 0.12 and caps:
            caps.append(one_word_edit(rng.choice(caps[-50_000:]), rng)[0])
        else:
            caps.append(sample_caption(rng, dense_share))
    root.mkdir(parents=True, exist_ok=True)
    paths, per = [], -(-rows // 8)
    for f in range(8):
        part = caps[f * per : (f + 1) * per]
        if f % 2 == 0:
            path = root / f"inputs-{f}.jsonl"
            with open(path, "wb") as fh:
                fh.write(b"".join(json.dumps({"caption": c}).encode() + b"\n" for c in part[:-3]))
                fh.write(b'{"caption": "broken\n' + b'{"caption": "\xff\xfe"}\n' + b'{"prompt": "no caption"}\n')
        else:
            path = root / f"inputs-{f}.parquet"
            pq.write_table(pa.table({"caption": part}), path, row_group_size=100_000)
        paths.append(path)
    return paths


def _tree_rss(pid: int) -> int:
    """RSS (bytes) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def scale_run(paths: list[Path], out: Path, workers: int, extra: list[str]) -> dict:
    """`lightgen-data build-captions` under /usr/bin/time -v; peak RSS of the process tree sampled every 0.5 s."""
    exe = Path(sys.executable).with_name("lightgen-data")
    cmd = [
        "/usr/bin/time",
        "-v",
        str(exe),
        "build-captions",
        "--output",
        str(out),
        "--embedder",
        "hash",
        "--n",
        "1000000",
        "--workers",
        str(workers),
        "--overwrite",
        *extra,
    ]
    for p in paths:
        cmd += ["--input", str(p)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(stderr[-3000:])
    report = json.loads(stdout.strip().splitlines()[-1])
    grab = lambda key: re.search(rf"{key}: (.+)", stderr).group(1).strip()
    return {
        "inputs": report["inputs"],
        "workers": workers,
        "wall_s": report["seconds"],
        "rows_per_s": report["captions_per_s"],
        "max_rss_gib": round(int(grab("Maximum resident set size \\(kbytes\\)")) / 2**20, 2),
        "tree_rss_peak_gib": round(peak[0] / 2**30, 2),
        "cpu_s": round(float(grab("User time \\(seconds\\)")) + float(grab("System time \\(seconds\\)")), 1),
        "timings": report["timings"],
        "removed_by_reason": report["removed_by_reason"],
        "near_dup": report.get("near_dup"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["planted", "scale"])
    ap.add_argument("--root", default="/tmp/captions-bench")
    ap.add_argument("--distinct", type=int, default=200_000)
    ap.add_argument("--shapes", type=int, default=20_000)
    ap.add_argument("--edits", type=int, default=20_000)
    ap.add_argument("--edit-words", default="0:0,8:8,10:10,8:12,8:14,8:16")
    ap.add_argument("--rows", default="100000,1000000,2000000")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-share", type=float, default=0.5, help="share of long descriptive captions")
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    if a.what == "planted":
        path = planted_set(root, a.distinct, a.shapes, a.edits, a.seed, a.dense_share)
        for spec in a.edit_words.split(","):  # "E:C" = --near-dup-edit-words E --near-dup-change-words C
            e, c = (int(v) for v in spec.split(":"))
            kw = {"near_dup_edit_words": e, "near_dup_change_words": c}
            print(json.dumps(score_planted(path, root / "planted-out", **kw)), flush=True)
        return
    for rows in map(int, a.rows.split(",")):
        paths = scale_inputs(root / f"in-{rows}", rows, a.seed, a.dense_share)
        print(
            json.dumps({"uptime": os.getloadavg(), **scale_run(paths, root / f"out-{rows}", a.workers, [])}), flush=True
        )


if __name__ == "__main__":
    main()
