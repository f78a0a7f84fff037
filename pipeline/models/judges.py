"""The `build-dpo-pairs` judge: does a source image deserve to be a DPO winner for its caption?

One prompt (`judge_prompt`) asks a vision-language model to rate the image's quality and how exactly it matches
the caption, spatial relations included, and to answer with one line `Score: N` (N an integer 0-10). One strict
parser (`parse_answer`) reads that answer: the first non-empty line must be `Score: N`, `N`, `N/10` or yes/no
(markdown emphasis and a final period are tolerated); anything else, a score outside 0-10, or a later line with a
different score makes the answer unparseable. Scores are normalised to [0, 1] (N / 10, yes = 1, no = 0) and
`verdict` compares them with `--min-judge-score`. Prompt and parser are shared by every backend:

- `transformers` (default): Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration` + `AutoProcessor`) from a local
  directory, greedy decoding, batched with left padding;
- `vllm`: the same model through vLLM's offline `LLM.generate` (the optional `vllm` extra; imported only when
  this backend is built);
- `shapes`: the ShapesWorld scorer (`shapesworld.score.score_image`) against the caption's GenEval metadata; its
  answer is `Score: 10` or `Score: 0` followed by the scorer's reason, parsed like the others.

Messages are built in Qwen's chat format and their images prepared with `qwen_vl_utils.process_vision_info`.
Heavy libraries (torch, transformers, vllm, qwen_vl_utils) are imported inside the backends, never at import.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

BACKENDS = ("transformers", "vllm", "shapes")
MAX_SCORE = 10

PROMPT_TEMPLATE = (
    "You are rating an image for a text-to-image training set.\n"
    'Caption: "{caption}"\n'
    "Rate the image from 0 to 10 for two things together: its quality (sharp, clean, well composed, free of "
    "artifacts, distortions and garbled text) and how exactly it matches the caption: every object, count, color "
    "and attribute the caption names, and every spatial relation it states (left of, right of, above, below, on "
    "top of, next to) in the stated direction. Check each spatial relation carefully: a mirrored or missing "
    "relation, a wrong count or a wrong color means a score of 3 or less.\n"
    "Answer with exactly one line and nothing else, in the form: Score: N"
)
# Identifies the prompt in run configs: a changed prompt changes the judgements, so a resume must not mix them.
PROMPT_VERSION = hashlib.sha256(PROMPT_TEMPLATE.encode()).hexdigest()[:12]


def judge_prompt(caption: str) -> str:
    """The judge's instruction for one caption."""
    return PROMPT_TEMPLATE.format(caption=caption.replace("\n", " ").strip())


# ------------------------------------------------------------------------------------------------- the parser

_NUMBER = r"(?P<num>[+-]?\d+(?:\.\d+)?)"
_SCORE_LINE = re.compile(rf"^(?:score\s*[:=]?\s*)?{_NUMBER}\s*(?:/\s*10|out\s+of\s+10)?\s*\.?$", re.IGNORECASE)
_YES_NO = re.compile(r"^(?:answer\s*[:=]\s*)?(?P<word>yes|no)\s*\.?$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedAnswer:
    """A judge answer read by `parse_answer`: `score` in [0, 1], or None with `error` saying why."""

    score: float | None
    error: str = ""


def _clean(line: str) -> str:
    """A line without markdown emphasis / code marks and surrounding quotes or spaces."""
    return line.replace("*", "").replace("`", "").strip().strip("\"'").strip()


def _line_score(line: str) -> float | None:
    """The normalised score a cleaned line states, None if it states none; ValueError if out of range."""
    m = _SCORE_LINE.match(line)
    if m:
        value = float(m.group("num"))
        if not 0 <= value <= MAX_SCORE:
            raise ValueError(f"score {m.group('num')} outside 0-{MAX_SCORE}")
        return value / MAX_SCORE
    m = _YES_NO.match(line)
    if m:
        return 1.0 if m.group("word").lower() == "yes" else 0.0
    return None


def parse_answer(text: str) -> ParsedAnswer:
    """Read a judge answer strictly: the first non-empty line states the score; later lines may not contradict it."""
    lines = [_clean(line) for line in str(text).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ParsedAnswer(None, "empty answer")
    try:
        score = _line_score(lines[0])
    except ValueError as e:
        return ParsedAnswer(None, str(e))
    if score is None:
        return ParsedAnswer(None, f"first line {lines[0][:80]!r} is not 'Score: N' (N in 0-{MAX_SCORE}) or yes/no")
    for line in lines[1:]:
        try:
            other = _line_score(line)
        except ValueError:
            other = -1.0
        if other is not None and other != score:
            return ParsedAnswer(None, f"contradictory scores: {lines[0]!r} and {line[:80]!r}")
    return ParsedAnswer(score)


@dataclass(frozen=True)
class Judgement:
    """The judge's decision on one image: raw `answer`, parsed `score`, `reason` ("" = kept) and `detail`."""

    answer: str
    score: float | None
    reason: str
    detail: str

    @property
    def kept(self) -> bool:
        """Whether the image is kept as a winner."""
        return not self.reason


def verdict(answer: str, min_score: float) -> Judgement:
    """Parse `answer` and apply the threshold: kept, `judge_rejected` or `judge_unparseable` (raw text in detail)."""
    parsed = parse_answer(answer)
    if parsed.score is None:
        return Judgement(answer, None, "judge_unparseable", answer)
    if parsed.score < min_score:
        detail = f"score {parsed.score:.3g} < --min-judge-score {min_score:g}; answer: {answer}"
        return Judgement(answer, parsed.score, "judge_rejected", detail)
    return Judgement(answer, parsed.score, "", "")


# ----------------------------------------------------------------------------------------------- the messages


def build_messages(image: Image.Image, caption: str, max_pixels: int, min_pixels: int = 3136) -> list[dict[str, Any]]:
    """One Qwen chat conversation: the image (resized by `process_vision_info` within the pixel bounds) + prompt."""
    content = [
        {"type": "image", "image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
        {"type": "text", "text": judge_prompt(caption)},
    ]
    return [{"role": "user", "content": content}]


def prepare_prompts(processor: Any, conversations: list[list[dict[str, Any]]]) -> tuple[list[str], list[list[Any]]]:
    """(chat-template texts, per-conversation lists of resized images) for a batch of conversations."""
    from qwen_vl_utils import process_vision_info

    patch = int(getattr(getattr(processor, "image_processor", None), "patch_size", 14) or 14)
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images = [process_vision_info(c, image_patch_size=patch)[0] or [] for c in conversations]
    return texts, images


# ------------------------------------------------------------------------------------------------- the backends


class Judge(Protocol):
    """A loaded judge: `name` (backend and model) and `answers` (one raw text per image)."""

    name: str
    backend: str

    def answers(self, images: list[Image.Image], captions: list[str], metadata: list[dict | None]) -> list[str]:
        """One raw answer per (image, caption, metadata)."""
        ...


def _model_name(model: str) -> str:
    """`<directory name>-<config hash>` of a local model directory (the pipeline's encoder naming)."""
    from lightgen_model.encoders import config_name
    from pipeline.core import storage

    if storage.is_remote(model) and not storage.is_file(storage.join(model, "config.json")):
        raise ValueError(f"--judge-model {storage.public(model)!r} is not a model directory (no config.json)")
    model_dir = Path(storage.local_copy(model, files=("config.json",)))  # a remote folder: its config only
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--judge-model {model!r} is not a local model directory (no config.json)")
    return config_name(model_dir, model_dir / "config.json")


def judge_name(backend: str, model: str | None) -> str:
    """The name a judge records in the pair shards, computed without loading weights."""
    if backend == "shapes":
        return "shapes"
    if backend not in BACKENDS:
        raise ValueError(f"unknown --judge-backend {backend!r}: expected one of {BACKENDS}")
    if not model:
        raise ValueError(f"--judge-backend {backend} needs --judge-model DIR (a local Qwen2.5-VL directory)")
    return f"{backend}:{_model_name(model)}"


@dataclass(frozen=True)
class JudgeSettings:
    """How a Qwen2.5-VL judge runs (`dtype` auto: bfloat16 on a GPU, float32 elsewhere; the vLLM fields apply to
    the vllm backend only)."""

    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 16
    max_pixels: int = 1024 * 1024
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096
    seed: int = 0


class _QwenJudge:
    """What both Qwen2.5-VL backends share: the prompt, the processor, one raw answer per image."""

    backend = ""

    def __init__(self, model: str, settings: JudgeSettings) -> None:
        from transformers import AutoProcessor

        self.name = judge_name(self.backend, model)
        self.settings = settings
        self.processor = AutoProcessor.from_pretrained(model)

    def answers(self, images: list[Image.Image], captions: list[str], metadata: list[dict | None]) -> list[str]:
        """One raw answer per (image, caption)."""
        max_pixels = self.settings.max_pixels
        conversations = [build_messages(im, cap, max_pixels) for im, cap in zip(images, captions, strict=True)]
        texts, vision = prepare_prompts(self.processor, conversations)
        return self.generate(texts, vision)

    def generate(self, texts: list[str], images: list[list[Any]]) -> list[str]:
        """The new text of each chat-template `text` with its images."""
        raise NotImplementedError


class TransformersJudge(_QwenJudge):
    """Qwen2.5-VL through transformers, greedy decoding, one padded batch per call."""

    backend = "transformers"

    def __init__(self, model: str, settings: JudgeSettings) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        from lightgen_model.encoders import resolve_device, resolve_dtype

        super().__init__(model, settings)
        self.device = resolve_device(settings.device)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        dtype = resolve_dtype(settings.dtype, self.device)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=dtype)
        self.model = self.model.to(self.device).eval().requires_grad_(False)

    def generate(self, texts: list[str], images: list[list[Any]]) -> list[str]:
        """Greedy generation for chat-template `texts` with their images; the new text of each row."""
        import torch

        flat = [im for row in images for im in row]
        inputs = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt").to(self.device)
        pad = self.processor.tokenizer.pad_token_id
        n_new = self.settings.max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


class VLLMJudge(_QwenJudge):
    """Qwen2.5-VL through vLLM's offline engine (optional extra `vllm`), greedy decoding."""

    backend = "vllm"

    def __init__(self, model: str, settings: JudgeSettings) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ValueError(
                f"--judge-backend vllm needs the optional vllm extra (pip install 'lightgen[vllm]'): {e}"
            ) from e
        super().__init__(model, settings)
        self.llm = LLM(
            model=str(model),
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            limit_mm_per_prompt={"image": 1},
            seed=settings.seed,
        )
        self.params = SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens)

    def generate(self, texts: list[str], images: list[list[Any]]) -> list[str]:
        """vLLM generation, one request per text with its images; outputs come back in request order."""
        requests = [{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in zip(texts, images, strict=True)]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


class ShapesJudge:
    """The ShapesWorld scorer as a judge: `Score: 10` when the image satisfies the caption's metadata, else 0."""

    backend = "shapes"
    name = "shapes"

    def answers(self, images: list[Image.Image], captions: list[str], metadata: list[dict | None]) -> list[str]:
        """One answer per image: the score line, then the scorer's verdict and detections (JSON)."""
        from shapesworld.score import score_image

        out = []
        for image, meta in zip(images, metadata, strict=True):
            if meta is None:
                raise ValueError("the shapes judge needs each sample's ShapesWorld metadata")
            result = score_image(image.convert("RGB"), meta)
            found = [d.as_dict() for d in result.detections]
            why = "correct" if result.correct else result.reason.replace("\n", "; ")
            out.append(f"Score: {MAX_SCORE if result.correct else 0}\n{why}\n{json.dumps(found)}")
        return out


def build_judge(backend: str, model: str | None = None, **settings: Any) -> Judge:
    """Load the judge of `backend` (`model`: a local Qwen2.5-VL directory for transformers / vllm; `settings`:
    fields of `JudgeSettings`)."""
    judge_name(backend, model)  # checks the backend name and the model directory before any loading
    if backend == "shapes":
        return ShapesJudge()
    cls = TransformersJudge if backend == "transformers" else VLLMJudge
    return cls(model, JudgeSettings(**settings))


def judge_batch(
    judge: Judge,
    images: list[Image.Image],
    captions: list[str],
    metadata: list[dict | None],
    min_score: float,
) -> list[Judgement]:
    """Ask `judge` about a batch and decide each image (see `verdict`)."""
    answers = judge.answers(images, captions, metadata)
    if len(answers) != len(images):
        raise RuntimeError(f"judge {judge.name} returned {len(answers)} answers for {len(images)} images")
    return [verdict(a, min_score) for a in answers]
