"""`lightgen generate / inpaint / geneval` and the Python API (LightGenPipeline) on the `debug` model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wake_head
from PIL import Image
from tiny_models import make_tiny_bert, make_tiny_vae
from typer.testing import CliRunner, Result

from lightgen.api import LightGenPipeline, to_pil
from lightgen.cli import app
from lightgen.geneval import group_seed
from lightgen_model import LightGen, SamplingDefaults, preset, save_pretrained

runner = CliRunner()


def _save_model(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    save_pretrained(wake_head(LightGen(preset("debug", **overrides))), path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bert_dir: Path) -> Path:
    """The debug model with a 32-dim tiny BERT as its text encoder (named by path in config.json)."""
    return _save_model(tmp_path_factory.mktemp("model"), text_dim=32, text_encoder=str(bert_dir))


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> LightGenPipeline:
    return LightGenPipeline.from_pretrained(model_dir, device="cpu")


def _arr(path: Path | Image.Image) -> np.ndarray:
    return np.asarray(Image.open(path) if isinstance(path, Path) else path).astype(np.int16)


def _gen(g: int) -> torch.Generator:
    return torch.Generator().manual_seed(g)


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _generate(model: Path, prompt: str, out: Path, *options: object) -> Result:
    """`lightgen generate --model MODEL --prompt PROMPT --out OUT OPTIONS`: its result."""
    return _invoke("generate", "--model", model, "--prompt", prompt, "--out", out, *options)


# ------------------------------------------------------------------------------------------------ generate


def test_generate_cli_equals_api_with_the_same_seed(model_dir: Path, pipe: LightGenPipeline, tmp_path: Path) -> None:
    prompts = ["a red circle", "two blue squares"]
    res = _invoke(
        "generate",
        "--model",
        model_dir,
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--out",
        tmp_path,
        "--images-per-prompt",
        2,
        "--batch-size",
        3,
        "--seed",
        5,
        "--steps",
        6,
        "--cfg",
        3.0,
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    assert "images/s" in res.output
    api = pipe(
        prompts, num_inference_steps=6, guidance_scale=3.0, num_images_per_prompt=2, batch_size=3, generator=_gen(5)
    ).images
    side = json.loads((tmp_path / "generation.json").read_text())
    assert [e["file"] for e in side["images"]] == [f"{i:05d}.png" for i in range(4)]
    assert [e["prompt"] for e in side["images"]] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert side["settings"] | {"seed": 5, "steps": 6, "cfg": 3.0, "batch_size": 3} == side["settings"]
    assert side["images_per_second"] > 0
    for i, image in enumerate(api):
        cli = _arr(tmp_path / f"{i:05d}.png")
        assert cli.shape == (32, 32, 3)
        assert np.array_equal(cli, _arr(image)), i
    other = pipe(
        prompts, num_inference_steps=6, guidance_scale=3.0, num_images_per_prompt=2, batch_size=3, generator=_gen(6)
    ).images
    assert not np.array_equal(_arr(other[0]), _arr(api[0]))  # the seed matters: equality above is not trivial


def test_prompt_changes_the_image_and_batching_is_reproducible(pipe: LightGenPipeline) -> None:
    a = pipe(["a red circle", "a green cross"], num_inference_steps=4, generator=_gen(1))
    b = pipe(["a red circle", "a green cross"], num_inference_steps=4, generator=_gen(1))
    c = pipe(["a blue square", "a green cross"], num_inference_steps=4, generator=_gen(1))
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents[0], c.latents[0])  # the text reaches the image
    assert a.latents.shape == (2, 3, 32, 32) and len(a.images) == 2


def test_generate_prompt_file_non_square_and_default_encoder(tmp_path: Path) -> None:
    """A debug model as saved by the preset (pixel tokens, MiniLM named in config.json), prompts from a file."""
    model = _save_model(tmp_path / "m")
    (tmp_path / "p.txt").write_text("a red circle\n\n  a photo of two squares  \n")
    res = _invoke(
        "generate",
        "--model",
        model,
        "--prompts",
        tmp_path / "p.txt",
        "--out",
        tmp_path / "o",
        "--height",
        48,
        "--width",
        32,
        "--steps",
        3,
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "o" / "generation.json").read_text())
    assert [e["prompt"] for e in side["images"]] == ["a red circle", "a photo of two squares"]
    assert side["settings"]["text_encoder"] == "minilm" and side["settings"]["vae"] == "pixel"
    assert Image.open(tmp_path / "o" / "00001.png").size == (32, 48)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cross", "tag": "x"}\n{"prompt": "two circles"}\n')
    res = _invoke(
        "generate",
        "--model",
        model,
        "--prompts",
        tmp_path / "p.jsonl",
        "--out",
        tmp_path / "j",
        "--steps",
        2,
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    assert [e["prompt"] for e in json.loads((tmp_path / "j" / "generation.json").read_text())["images"]] == [
        "a cross",
        "two circles",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/nope", "--prompt", "a cube"], "model directory does not exist"),
        (["--model", "{model}", "--prompts", "{tmp}/empty.txt"], "no prompts in"),
        (["--model", "{model}"], "give either --prompt"),
        (["--model", "{model}", "--prompt", "a", "--prompts", "{tmp}/empty.txt"], "give either --prompt"),
        (["--model", "{model}", "--prompt", "a cube", "--resolution", "30"], "not a positive multiple of 4"),
        (["--model", "{model}", "--prompt", "   "], "--prompt 1 is empty"),
        (
            ["--model", "{model}", "--prompt", "a", "--cfg-schedule", "cosine"],
            "schedule (guidance_schedule) must be one of",
        ),
        (["--model", "{model}", "--prompt", "a", "--vae", "{tmp}/novae"], "novae' is neither one of ['pixel']"),
        (["--model", "{model}", "--prompt", "a", "--text-encoder", "minilm"], "gives 384-dim states"),
    ],
)
def test_generate_bad_inputs_give_clear_errors(model_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.format(tmp=tmp_path, model=model_dir) for a in args]
    res = _invoke("generate", *args, "--out", tmp_path / "o", "--steps", 2, "--device", "cpu")
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    res = _generate(model_dir, "a", tmp_path, "--device", "cuda")
    assert res.exit_code == 2 and "no CUDA GPU is visible" in res.output, res.output


def test_component_named_in_config_must_be_local(tmp_path: Path, bert_dir: Path) -> None:
    model = _save_model(tmp_path / "m", text_dim=32, text_encoder=str(bert_dir), vae="stabilityai/sd35/vae")
    res = _generate(model, "a", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 2 and "'stabilityai/sd35/vae'" in res.output and "--vae" in res.output, res.output
    res = _generate(model, "a", tmp_path / "o", "--device", "cpu", "--vae", "pixel", "--steps", 2)
    assert res.exit_code == 0, res.output


def test_text_padding_is_masked_or_reference_padded(pipe: LightGenPipeline, tmp_path: Path, bert_dir: Path) -> None:
    text, mask = pipe.encode_prompt(["a red circle and a blue square", "a cross"])
    assert mask.tolist()[1] == [True] * 4 + [False] * (text.shape[1] - 4)  # [CLS] a cross [SEP]
    assert torch.all(text[1, 4:] == 0)
    ref = _save_model(tmp_path / "r", text_dim=32, text_encoder=str(bert_dir), text_key_mask=False, buffer_size=0)
    rpipe = LightGenPipeline.from_pretrained(ref, device="cpu")
    rtext, rmask = rpipe.encode_prompt(["a cross"])
    assert rtext.shape[1] == 32 and int(rmask.sum()) == 4  # padded to max_text_len with the encoder's own states
    assert torch.allclose(rtext[0, :4], text[1, :4], atol=5e-3) and rtext[0, 4:].abs().sum() > 0


def test_recorded_sampling_defaults_are_used_unless_overridden(
    tmp_path: Path, bert_dir: Path, geneval_metadata: Path
) -> None:
    """config.json's `sampling` drives the API, `generate` and `geneval`; any setting can still be given; a
    config.json without it (older checkpoints) keeps the library defaults."""
    rec = {"steps": 3, "cfg": 2.5, "cfg_schedule": "constant", "temperature": 0.7}
    model = _save_model(tmp_path / "m", text_dim=32, text_encoder=str(bert_dir), sampling=rec)
    pipe = LightGenPipeline.from_pretrained(model, device="cpu")
    assert pipe.sampling_settings() == SamplingDefaults(**rec)
    a = pipe("a red circle", generator=_gen(0))
    explicit = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=2.5,
        guidance_schedule="constant",
        temperature=0.7,
        generator=_gen(0),
    )
    assert torch.equal(a.latents, explicit.latents)
    assert not torch.equal(a.latents, pipe("a red circle", guidance_schedule="linear", generator=_gen(0)).latents)
    res = _generate(model, "a red circle", tmp_path / "g", "--device", "cpu")
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "g" / "generation.json").read_text())["settings"]
    assert {k: settings[k] for k in rec} == rec and settings["head_steps"] == 20
    assert np.array_equal(_arr(tmp_path / "g" / "00000.png"), _arr(a.images[0]))
    res = _generate(
        model,
        "a red circle",
        tmp_path / "o",
        "--device",
        "cpu",
        "--steps",
        2,
        "--cfg-schedule",
        "linear-reference",
        "--head-steps",
        "ddim10",
    )
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "o" / "generation.json").read_text())["settings"]
    assert (settings["steps"], settings["cfg"], settings["cfg_schedule"], settings["head_steps"]) == (
        2,
        2.5,
        "linear-reference",
        "ddim10",
    )
    res = _invoke(
        "geneval",
        "--model",
        model,
        "--metadata",
        geneval_metadata,
        "--out",
        tmp_path / "ge",
        "--limit",
        1,
        "--samples",
        1,
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    ge = json.loads((tmp_path / "ge" / "geneval_settings.json").read_text())
    assert {k: ge[k] for k in rec} == rec
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    del cfg["sampling"]
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    assert LightGenPipeline.from_pretrained(old, device="cpu").sampling_settings() == SamplingDefaults(
        steps=64, cfg=4.0, cfg_schedule="linear", temperature=1.0
    )
    res = _generate(model, "a", tmp_path / "x", "--head-steps", "ddim37")
    assert res.exit_code == 2 and "no integer stride gives exactly 37" in res.output, res.output


# ------------------------------------------------------------------------------------------------- inpaint


def _square_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    m = np.zeros(size, np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = 255
    return Image.fromarray(m)


def _inpaint(model: Path, tmp_path: Path, prompt: str, *options: object) -> Result:
    """`lightgen inpaint` of TMP/in.png under TMP/mask.png into TMP/out.png (OPTIONS, then --device cpu): its result."""
    return _invoke(
        "inpaint",
        "--model",
        model,
        "--image",
        tmp_path / "in.png",
        "--mask",
        tmp_path / "mask.png",
        "--prompt",
        prompt,
        "--out",
        tmp_path / "out.png",
        *options,
        "--device",
        "cpu",
    )


def test_inpaint_keeps_unmasked_pixels_and_matches_api(model_dir: Path, pipe: LightGenPipeline, tmp_path: Path) -> None:
    src = pipe("two blue squares", num_inference_steps=4, generator=_gen(0)).images[0]
    src.save(tmp_path / "in.png")
    mask = _square_mask((32, 32), (5, 19, 3, 14))  # not aligned to the 4-px tokens
    mask.save(tmp_path / "mask.png")
    res = _inpaint(model_dir, tmp_path, "a red circle", "--steps", 5, "--seed", 3)
    assert res.exit_code == 0, res.output
    out, inp, m = _arr(tmp_path / "out.png"), _arr(src), np.asarray(mask) > 127
    assert np.array_equal(out[~m], inp[~m])  # pixel tokenizer: exactly the input outside the mask
    assert np.abs(out[m] - inp[m]).mean() > 5  # and something new inside
    api = pipe.inpaint(src, mask, "a red circle", num_inference_steps=5, generator=_gen(3))
    assert np.array_equal(out, _arr(api.images[0]))
    # tokens without a masked pixel are kept bit for bit; tokens touching the mask were regenerated
    clean = pipe.encode_image(torch.from_numpy(inp).permute(2, 0, 1)[None].float() / 127.5 - 1)
    tok = torch.from_numpy(m).reshape(8, 4, 8, 4).any(3).any(1)  # (8, 8) token grid
    pix_tok = tok.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(api.latents[0][:, ~pix_tok], clean[0][:, ~pix_tok])
    assert not torch.equal(api.latents[0][:, pix_tok], clean[0][:, pix_tok])
    assert json.loads((tmp_path / "out.json").read_text())["prompt"] == "a red circle"


def test_inpaint_batch_of_prompts_keeps_unmasked_region(pipe: LightGenPipeline) -> None:
    src = to_pil(torch.rand(1, 3, 32, 32) * 2 - 1)[0]
    mask = _square_mask((32, 32), (16, 32, 0, 32))
    res = pipe.inpaint(src, mask, ["a red circle", "a green cross"], num_inference_steps=4, generator=_gen(0))
    inp = _arr(src)
    for im in res.images:
        assert np.array_equal(_arr(im)[:16], inp[:16])
    assert not np.array_equal(_arr(res.images[0]), _arr(res.images[1]))


@pytest.mark.parametrize(
    ("image_size", "mask_size", "message"),
    [
        ((32, 32), (32, 16), "mask size 16x32 (WxH) differs from image size 32x32"),
        ((30, 32), (30, 32), "not a multiple of the model's token size 4 px"),
        ((32, 32), None, "mask has no white"),
    ],
)
def test_inpaint_bad_inputs(model_dir: Path, tmp_path: Path, image_size, mask_size, message: str) -> None:
    Image.new("RGB", image_size[::-1]).save(tmp_path / "in.png")
    Image.new("L", (mask_size or image_size)[::-1], 255 if mask_size else 0).save(tmp_path / "mask.png")
    res = _inpaint(model_dir, tmp_path, "a circle")
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "out.png").exists()


def test_inpaint_with_a_vae_keeps_its_round_trip(tmp_path: Path, bert_dir: Path) -> None:
    """With a diffusers VAE (shipped in the model folder, named relatively), outside the mask = decode(encode(x))."""
    model = _save_model(
        tmp_path / "m",
        latent_channels=16,
        vae_stride=8,
        patch_size=1,
        text_dim=32,
        text_encoder=str(bert_dir),
        vae="vae",
    )
    make_tiny_vae(model / "vae")
    pipe = LightGenPipeline.from_pretrained(model, device="cpu")
    assert pipe.vae.stride == 8
    src = to_pil(torch.rand(1, 3, 32, 32) * 2 - 1)[0]
    mask = _square_mask((32, 32), (0, 12, 0, 32))
    res = pipe.inpaint(src, mask, "a red circle", num_inference_steps=3, generator=_gen(0))
    x = torch.from_numpy(_arr(src)).permute(2, 0, 1)[None].float() / 127.5 - 1
    roundtrip = _arr(to_pil(pipe.decode(pipe.encode_image(x)))[0])
    out, m = _arr(res.images[0]), np.asarray(mask) > 127
    assert np.array_equal(out[~m], roundtrip[~m])
    assert not np.array_equal(out[m], roundtrip[m])


def test_pipeline_refuses_mismatched_components(model_dir: Path, pipe: LightGenPipeline) -> None:
    class Wide:
        name, dim = "wide", 64

    with pytest.raises(ValueError, match="gives 64-dim states, the model expects text_dim=32"):
        LightGenPipeline(pipe.model, pipe.vae, Wide())

    class Latent4:
        name, latent_channels, stride = "four", 4, 1

    with pytest.raises(ValueError, match="gives 4 channels at stride 1"):
        LightGenPipeline(pipe.model, Latent4(), pipe.text_encoder)


# ------------------------------------------------------------------------------------------------- geneval


def _geneval_result(model: Path, metadata: Path, out: Path, *extra: object) -> Result:
    """`lightgen geneval` of `model` on `metadata` into `out`: 2 samples a prompt, batch 4, 3 steps, CPU; its result."""
    return _invoke(
        "geneval",
        "--model",
        model,
        "--metadata",
        metadata,
        "--out",
        out,
        "--samples",
        2,
        "--batch-size",
        4,
        "--steps",
        3,
        "--device",
        "cpu",
        *extra,
    )


def _geneval(model: Path, metadata: Path, out: Path, *extra) -> str:
    res = _geneval_result(model, metadata, out, *extra)
    assert res.exit_code == 0, res.output
    return res.output


def test_geneval_layout_on_the_real_metadata(model_dir: Path, tmp_path: Path, geneval_metadata: Path) -> None:
    lines = geneval_metadata.read_bytes().splitlines(keepends=True)[:5]
    _geneval(model_dir, geneval_metadata, tmp_path / "g", "--limit", 5)
    folders = sorted(p.name for p in (tmp_path / "g").iterdir() if p.is_dir())
    assert folders == [f"{i:05d}" for i in range(5)]
    for i, line in enumerate(lines):
        d = tmp_path / "g" / f"{i:05d}"
        assert (d / "metadata.jsonl").read_bytes() == line  # byte for byte
        assert sorted(p.name for p in d.iterdir()) == ["metadata.jsonl", "samples"]
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(d / "samples" / "0000.png").mode == "RGB"
    assert json.loads((tmp_path / "g" / "geneval_settings.json").read_text())["samples"] == 2


def test_geneval_resumes_and_equals_the_api(
    model_dir: Path, pipe: LightGenPipeline, tmp_path: Path, geneval_metadata: Path
) -> None:
    meta = tmp_path / "meta.jsonl"
    meta.write_bytes(b"".join(geneval_metadata.read_bytes().splitlines(keepends=True)[10:15]))
    out = tmp_path / "g"
    _geneval(model_dir, meta, out, "--seed", 7)
    first = {p: p.read_bytes() for p in sorted(out.rglob("*.png"))}
    # prompts 2 and 3 form one group (batch 4 / 2 samples): their images are the API call with that group's seed
    prompts = [json.loads(line)["prompt"] for line in meta.read_text().splitlines()]
    api = pipe(
        prompts[2:4], num_inference_steps=3, num_images_per_prompt=2, batch_size=4, generator=_gen(group_seed(7, 2))
    ).images
    for j, im in enumerate(api):
        assert np.array_equal(_arr(out / f"{2 + j // 2:05d}" / "samples" / f"{j % 2:04d}.png"), _arr(im))
    # a killed run: prompt 3 lost a sample, prompt 4 its metadata; the rest must stay untouched
    (out / "00003" / "samples" / "0001.png").unlink()
    (out / "00004" / "metadata.jsonl").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in first if p.parent.parent.name in ("00000", "00001", "00002")}
    text = _geneval(model_dir, meta, out, "--seed", 7)
    assert "3 already done, 2 generated" in text
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.read_bytes() for p in sorted(out.rglob("*.png"))} == first  # redrawn exactly
    assert not list(out.rglob(".tmp-*"))
    res = _geneval_result(model_dir, meta, out, "--seed", 8)
    assert res.exit_code == 2 and "other settings" in res.output and "'seed': (7, 8)" in res.output, res.output
    assert "0 already done, 5 generated" in _geneval(model_dir, meta, out, "--seed", 8, "--overwrite")


def test_geneval_records_and_checks_which_weights_it_sampled(
    tmp_path: Path, bert_dir: Path, geneval_metadata: Path
) -> None:
    """A model saved with EMA weights: the settings say "ema" or "raw", the two give other images, and resuming a
    folder with the other weights is refused with the change named (the samples would mix two networks)."""
    torch.manual_seed(0)
    net = wake_head(LightGen(preset("debug", text_dim=32, text_encoder=str(bert_dir))))
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    model = save_pretrained(net, tmp_path / "m", ema_state=ema)
    meta = tmp_path / "meta.jsonl"
    meta.write_bytes(geneval_metadata.read_bytes().splitlines(keepends=True)[0])
    _geneval(model, meta, tmp_path / "e")
    _geneval(model, meta, tmp_path / "r", "--no-ema")
    weights = {w: json.loads((tmp_path / w / "geneval_settings.json").read_text())["weights"] for w in "er"}
    assert weights == {"e": "ema", "r": "raw"}
    image = "00000/samples/0000.png"
    assert not np.array_equal(_arr(tmp_path / "e" / image), _arr(tmp_path / "r" / image))
    res = _geneval_result(model, meta, tmp_path / "e", "--no-ema")
    assert res.exit_code == 2 and "'weights': ('ema', 'raw')" in res.output, res.output
    res = _generate(model, "a red circle", tmp_path / "g", "--steps", 2, "--device", "cpu", "--no-ema")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["settings"]["weights"] == "raw"


def test_geneval_refuses_a_folder_of_other_metadata(model_dir: Path, tmp_path: Path, geneval_metadata: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = geneval_metadata.read_bytes().splitlines(keepends=True)
    a.write_bytes(lines[0])
    b.write_bytes(lines[1])
    _geneval(model_dir, a, tmp_path / "g")
    res = _invoke(
        "geneval",
        "--model",
        model_dir,
        "--metadata",
        b,
        "--out",
        tmp_path / "g",
        "--samples",
        2,
        "--batch-size",
        4,
        "--steps",
        3,
        "--device",
        "cpu",
    )
    assert res.exit_code == 2 and "holds a different metadata line" in res.output, res.output
    b.write_text('{"tag": "x"}\n')
    res = _invoke("geneval", "--model", model_dir, "--metadata", b, "--out", tmp_path / "h", "--device", "cpu")
    assert res.exit_code == 2 and "b.jsonl:1: no non-empty string field 'prompt'" in res.output, res.output


def test_geneval_on_shapesworld_is_scored_by_lightgen_shapes_score(model_dir: Path, tmp_path: Path) -> None:
    meta = tmp_path / "shapes.jsonl"
    res = _invoke("shapes", "prompts", "--n", 6, "--seed", 1, "--out", meta)
    assert res.exit_code == 0, res.output
    _geneval(model_dir, meta, tmp_path / "g", "--field", "caption")
    res = _invoke("shapes", "score", tmp_path / "g")
    assert res.exit_code == 0, res.output
    assert "Total images: 12" in res.output and "Total prompts: 6" in res.output
    scores = json.loads((tmp_path / "g" / "scores.json").read_text())
    assert [r["metadata"] for r in scores["images"][::2]] == [json.loads(x) for x in meta.read_text().splitlines()]


def test_geneval_copies_odd_metadata_lines_byte_for_byte(model_dir: Path, tmp_path: Path) -> None:
    lines = [
        '{"prompt":"a photo of a café",  "tag":"single_object","include":[{"class":"cup","count":1}]}\r\n'.encode(),
        b'{"include": [{"class": "cup", "count": 2}], "tag": "counting", "prompt": "two cups", "x": "\\u00e9"}',
    ]  # compact separators, CRLF, key order, a unicode escape, no final newline: none of it may change
    meta = tmp_path / "odd.jsonl"
    meta.write_bytes(lines[0] + b"\n" + lines[1])
    _geneval(model_dir, meta, tmp_path / "g")
    assert (tmp_path / "g" / "00000" / "metadata.jsonl").read_bytes() == lines[0]
    assert (tmp_path / "g" / "00001" / "metadata.jsonl").read_bytes() == lines[1]
    assert not (tmp_path / "g" / "00002").exists()  # the blank line is no prompt
