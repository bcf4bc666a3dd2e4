"""Sample images during training from kohya-style prompt files, without disturbing training's state.

Sampling runs the model being trained in eval mode under no_grad, then restores train mode, devices and every
random stream, so a run with samples trains exactly like a run without them.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import tomlkit
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from kohya_backend.config.choices import SAMPLERS
from kohya_backend.errors import ConfigError, ConfigIssue, ModelError
from kohya_backend.families import family_for
from kohya_backend.fileio import atomic_write
from kohya_backend.train.noise import NUM_TRAIN_TIMESTEPS, normalize_prediction_type
from kohya_backend.train.state import rng_states, set_rng_states

_OPTION = re.compile(r"^(ss|n|w|h|d|l|s)\s+(.*)$", re.IGNORECASE | re.DOTALL)
_TOML_PROMPT_TABLE = re.compile(r"^\s*\[prompt\]\s*$", re.MULTILINE)


@dataclass
class SamplePrompt:
    """One image to sample: prompt, negative prompt, size, seed (None = random), CFG scale, steps, sampler."""

    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    steps: int = 20
    sampler: str | None = None


def _prompt_issue(message: str, line: int | None = None, hint: str | None = None) -> ConfigError:
    return ConfigError([ConfigIssue(message=message, key="sample_prompts", line=line, hint=hint)])


def _image_side(value: int) -> int:
    """kohya samples at sizes rounded down to a multiple of 8, at least 64."""
    return max(64, value - value % 8)


def _apply_option(prompt: SamplePrompt, name: str, value: str) -> None:
    name = name.lower()
    if name == "n":
        prompt.negative = value
    elif name == "ss":
        prompt.sampler = value
    elif name in ("w", "h", "d", "s"):
        number = int(value)
        if name == "w":
            prompt.width = _image_side(number)
        elif name == "h":
            prompt.height = _image_side(number)
        elif name == "d":
            prompt.seed = number
        else:
            prompt.steps = max(1, min(1000, number))
    else:
        prompt.scale = float(value)


def _parse_line(line: str, number: int, default_size: tuple[int, int]) -> SamplePrompt:
    parts = f" {line}".split(" --")
    prompt = SamplePrompt(
        prompt=parts[0].strip(), width=_image_side(default_size[0]), height=_image_side(default_size[1])
    )
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        if match is None:
            raise _prompt_issue(
                f"unknown or empty option --{part.strip()!r}",
                number,
                "options: --n negative, --w width, --h height, --d seed, --l cfg scale, --s steps, --ss sampler",
            )
        try:
            _apply_option(prompt, match.group(1), match.group(2).strip())
        except ValueError as exc:
            raise _prompt_issue(f"bad value in --{part.strip()}: {exc}", number) from exc
    if not prompt.prompt:
        raise _prompt_issue("the prompt text before the options is empty", number)
    return prompt


def _pick(entry: dict, names: tuple[str, ...], default: Any) -> Any:
    """The first of kohya's alternative key names that is set, else the default."""
    for name in names:
        if entry.get(name) is not None:
            return entry[name]
    return default


def _from_mapping(entry: Any, index: int, default_size: tuple[int, int]) -> SamplePrompt:
    if not isinstance(entry, dict) or not str(entry.get("prompt") or "").strip():
        raise _prompt_issue(f"prompt entry {index + 1} has no 'prompt' text", hint='e.g. {"prompt": "a cat"}')
    try:
        sampler = _pick(entry, ("sample_sampler", "sampler"), None)
        seed = _pick(entry, ("seed", "sample_seed"), None)
        return SamplePrompt(
            prompt=str(entry["prompt"]).strip(),
            negative=str(_pick(entry, ("negative_prompt", "negative"), "")),
            width=_image_side(int(_pick(entry, ("width",), default_size[0]))),
            height=_image_side(int(_pick(entry, ("height",), default_size[1]))),
            seed=None if seed is None else int(seed),
            scale=float(_pick(entry, ("scale", "guidance_scale"), 7.5)),
            steps=max(1, min(1000, int(_pick(entry, ("sample_steps", "steps"), 20)))),
            sampler=None if sampler is None else str(sampler),
        )
    except (TypeError, ValueError) as exc:
        raise _prompt_issue(f"prompt entry {index + 1} has a bad value: {exc}") from exc


def _structured_entries(text: str) -> list[Any] | None:
    """kohya's .json (a list of prompt dicts) and .toml ([prompt] defaults + [[prompt.subset]]) forms."""
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")) and not _TOML_PROMPT_TABLE.search(text):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _prompt_issue(f"invalid JSON: {exc.msg}", exc.lineno) from exc
        return data if isinstance(data, list) else [data]
    if _TOML_PROMPT_TABLE.search(text):
        try:
            table = tomlkit.parse(text).unwrap().get("prompt", {})
        except tomlkit.exceptions.ParseError as exc:
            raise _prompt_issue(f"invalid TOML: {exc}", getattr(exc, "line", None)) from exc
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return [{**defaults, **subset} for subset in table.get("subset", [])]
    return None


def parse_sample_prompts(text: str, *, default_size: tuple[int, int]) -> list[SamplePrompt]:
    """Read kohya's prompt file: one prompt per line with --n/--w/--h/--d/--l/--s/--ss, '#' comments.

    kohya's JSON list and TOML ([prompt] + [[prompt.subset]]) forms are recognised from the text as well.
    """
    entries = _structured_entries(text)
    if entries is not None:
        return [_from_mapping(entry, i, default_size) for i, entry in enumerate(entries)]
    prompts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(_parse_line(line, number, default_size))
    return prompts


def load_sample_prompts(path: Path, *, default_size: tuple[int, int]) -> list[SamplePrompt]:
    """Read a prompt file (.txt, .json or .toml) as `parse_sample_prompts` does."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _prompt_issue(
            f"cannot read {path}: {exc}", hint="point sample_prompts at a readable file"
        ) from exc
    return parse_sample_prompts(text, default_size=default_size)


def make_sample_scheduler(sampler: str, prediction_type: str = "epsilon") -> Any:
    """A fresh diffusers scheduler for a kohya sampler name, with SD's training betas."""
    key = sampler.strip().lower()
    entry = SAMPLERS.get(key)
    if entry is None:
        close = difflib.get_close_matches(key, list(SAMPLERS), n=1)
        raise ConfigError(
            [
                ConfigIssue(
                    message=f"unknown sampler {sampler!r}",
                    key="sample_sampler",
                    hint=(f"did you mean {close[0]}? " if close else "")
                    + f"supported: {', '.join(SAMPLERS)}",
                )
            ]
        )
    wanted: dict[str, Any] = {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": normalize_prediction_type(prediction_type),
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        **entry.settings,
    }
    cls = getattr(diffusers, entry.scheduler)
    accepted = inspect.signature(cls).parameters
    try:
        return cls(**{k: v for k, v in wanted.items() if k in accepted})
    except ImportError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    message=f"sampler {sampler!r} needs a package that is not installed: {exc}",
                    key="sample_sampler",
                    hint="pick another sampler (euler_a, ddim, dpmsolver++), or install the missing package",
                )
            ]
        ) from exc


def _build_pipeline(
    family: str, unet: Any, vae: Any, text_encoders: list, tokenizers: list, scheduler: Any
) -> Any:
    """The family's diffusers pipeline over the modules being trained (imported only when sampling: pipelines pull
    in image processors and quantisation backends)."""
    spec = family_for(family)
    if len(text_encoders) != spec.text_encoder_count or len(tokenizers) != spec.text_encoder_count:
        raise ModelError(
            f"cannot sample for family {family!r} with {len(text_encoders)} text encoder(s), "
            f"{len(tokenizers)} tokenizer(s)",
            f"{spec.label} needs {spec.text_encoder_count} text encoder(s) and tokenizer(s)",
        )
    parts: dict[str, Any] = {"vae": vae, "unet": unet, "scheduler": scheduler}
    for index, (encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers)):
        suffix = "" if index == 0 else f"_{index + 1}"
        parts[f"text_encoder{suffix}"] = encoder
        parts[f"tokenizer{suffix}"] = tokenizer
    pipeline_class = getattr(diffusers, spec.sample_pipeline)
    accepted = inspect.signature(pipeline_class).parameters
    optional = {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }
    parts.update({name: value for name, value in optional.items() if name in accepted})
    return pipeline_class(**parts)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    saved = rng_states()
    try:
        yield
    finally:
        set_rng_states(saved)


@contextlib.contextmanager
def _eval_on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Eval mode on `device` for the duration; every submodule's own train flag and device come back after."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    homes = []
    for module in modules:
        first = next(module.parameters(), None)
        homes.append((module, first.device if first is not None else None))
    try:
        for module in modules:
            module.eval()
            module.to(device)
        yield
    finally:
        for module, home in homes:
            if home is not None:
                module.to(home)
        for module, flag in flags:
            module.training = flag


def _decode(pipe: Any, vae: Any, latents: torch.Tensor) -> Image.Image:
    """Decode outside autocast, in the VAE's own dtype (an fp32 VAE for no_half_vae stays fp32)."""
    latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents)
        std_t = torch.tensor(std).view(shape).to(latents)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def _png_parameters(prompt: SamplePrompt, sampler: str, seed: int) -> str:
    """The WebUI's "parameters" text, so a sample's settings show in PNG Info."""
    lines = [prompt.prompt]
    if prompt.negative:
        lines.append(f"Negative prompt: {prompt.negative}")
    lines.append(
        f"Steps: {prompt.steps}, Sampler: {sampler}, CFG scale: {prompt.scale}, Seed: {seed}, "
        f"Size: {prompt.width}x{prompt.height}"
    )
    return "\n".join(lines)


def _save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info)
    atomic_write(path, encoded.getvalue())


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def _skipped_embeds(pipe: Any, text: str, clip_skip: int, device: torch.device) -> torch.Tensor:
    """SD 1.5 conditioning with kohya's clip_skip: hidden_states[-clip_skip] through the final layer norm."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_norm(hidden)


def _generate_one(
    pipe: Any,
    prompt: SamplePrompt,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    clip_skip: int | None,
) -> Image.Image:
    kwargs: dict[str, Any] = {
        "prompt": prompt.prompt,
        "negative_prompt": prompt.negative or None,
        "width": prompt.width,
        "height": prompt.height,
        "num_inference_steps": prompt.steps,
        "guidance_scale": prompt.scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "latent",
    }
    with _autocast(device, dtype), torch.no_grad():
        if clip_skip and clip_skip > 1:
            kwargs["prompt_embeds"] = _skipped_embeds(pipe, kwargs.pop("prompt"), clip_skip, device)
            negative = kwargs.pop("negative_prompt") or ""
            kwargs["negative_prompt_embeds"] = _skipped_embeds(pipe, negative, clip_skip, device)
        latents = pipe(**kwargs).images
    with torch.no_grad():
        return _decode(pipe, pipe.vae, latents)


def generate_samples(
    *,
    family: str,
    unet: Any,
    vae: Any,
    text_encoders: list,
    tokenizers: list,
    prompts: list[SamplePrompt],
    sampler: str,
    out_dir: Path,
    step: int,
    epoch: int,
    device: torch.device | str,
    dtype: torch.dtype,
    prediction_type: str = "epsilon",
    file_prefix: str = "sample",
    clip_skip: int | None = None,
    network: torch.nn.Module | None = None,
) -> list[Path]:
    """Render each prompt to out_dir/"{prefix}_e{epoch:06d}_s{step:08d}_{i:02d}.png"; training state is untouched.

    `network` (the LoRA being trained) is switched to eval too when given, so its dropout is off while sampling.
    """
    if not prompts:
        return []
    if not family_for(family).uses_clip_skip:
        clip_skip = None  # as kohya: this family always conditions on its penultimate layers
    device = torch.device(device)
    default_scheduler = make_sample_scheduler(sampler, prediction_type)
    per_prompt = {p.sampler: make_sample_scheduler(p.sampler, prediction_type) for p in prompts if p.sampler}
    pipe = _build_pipeline(family, unet, vae, text_encoders, tokenizers, default_scheduler)
    pipe.set_progress_bar_config(disable=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [unet, vae, *text_encoders] + ([network] if network is not None else [])
    paths: list[Path] = []
    with _preserved_rng(), _eval_on_device(modules, device):
        for index, prompt in enumerate(prompts):
            seed = prompt.seed if prompt.seed is not None else random.SystemRandom().randrange(2**32)
            pipe.scheduler = (
                per_prompt.get(prompt.sampler, default_scheduler) if prompt.sampler else default_scheduler
            )
            image = _generate_one(pipe, prompt, seed=seed, device=device, dtype=dtype, clip_skip=clip_skip)
            path = out_dir / f"{file_prefix}_e{epoch:06d}_s{step:08d}_{index:02d}.png"
            _save_png(image, path, _png_parameters(prompt, prompt.sampler or sampler, seed))
            paths.append(path)
    return paths
