"""The embedded default, end to end: every stage of LightGen on ShapesWorld, on a CPU, through the real CLIs.

    python -m recipes.shapes [--out runs/demo] [--images 330000] [--device cpu|cuda] [--ablation]

captions (build-captions) -> teacher images (synthesize) -> training shards (encode-latents) -> pretraining
(torchrun, 2 processes) -> held-out GenEval-layout samples + scores -> DPO pairs (build-dpo-pairs, shapes judge)
-> DPO (torchrun) -> samples + scores again -> runs/demo/report.html and scores.json, with PASS/FAIL per target.

Every stage runs as a subprocess of its real command line (logged under <out>/logs/). A finished stage is
recorded in <out>/stages.json and skipped on a rerun; an interrupted one resumes (the trainers from their newest
checkpoint, the pipeline stages from their finished shards). Ctrl-C at any point, rerun the same command.

The budget is work (training images, hence steps), fixed before the run: the same command gives the same model on
any machine, however busy (on a CPU bit for bit); a busy machine only takes longer. `--budget-minutes` adds a time
limit instead (the cosine then follows the elapsed share of it, so the model depends on the machine's speed).
"""
