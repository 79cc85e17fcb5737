"""Seeing images: a frozen CLIP vision tower (open_clip) and the learned visual prompt.

The visual prompt turns CLIP features into something added to the adaption prompt of every adapter layer,
so images reach the LLaMA only through the gated prompt path: at gate scale 0 the model is image-blind.

- v2 (official multimodal, `BIAS-7B` and friends): all CLIP tokens (class + patches, after `ln_post` and
  the projection) -> `clip_proj` + LayerNorm; `prompt_len` learned `visual_query` tokens are prepended;
  `visual_depth` timm ViT blocks; the first `prompt_len` outputs -> `visual_proj` + LayerNorm.
- v1 (the paper's ScienceQA variant): the CLIP global feature -> Linear + LayerNorm, added to every
  prompt token.
- grid (ours): the global feature and the patch tokens average-pooled to a g x g grid (prompt_len = 1 + g*g)
  -> Linear + LayerNorm, one per prompt token, so that the question picks the region it reads.

Preprocessing matches CLIP's (and the official demo's): short side resized to the tower's size (bicubic),
center crop, CLIP mean/std. `channel_order="bgr"` swaps red and blue first, as OpenCV-read images were.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import AdapterArgs, grid_side
from .formats.common import parsed_json
from .images import load_image
from .paths import missing, not_a_file

if TYPE_CHECKING:
    from .model import Transformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisualPromptV2(nn.Module):
    """Official v2 visual prompt; parameter names are the official ones (without a prefix)."""

    def __init__(self, adapter: AdapterArgs, dim: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        width = adapter.visual_dim
        self.clip_proj = nn.Linear(adapter.clip_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width)
        self.visual_query = nn.Embedding(adapter.prompt_len, width)
        self.visual_blocks = nn.ModuleList(
            Block(width, adapter.visual_heads, adapter.visual_mlp_ratio, qkv_bias=True)
            for _ in range(adapter.visual_depth))
        self.visual_proj = nn.Linear(width, dim)
        self.visual_proj_norm = nn.LayerNorm(dim)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, clip_dim] CLIP tokens -> [B, prompt_len, dim]."""
        feats = self.clip_proj_norm(self.clip_proj(clip_tokens.to(self.clip_proj.weight.dtype)))
        query = self.visual_query.weight.unsqueeze(0).expand(feats.shape[0], -1, -1)
        x = torch.cat([query, feats], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : query.shape[1]]))


class VisualPromptV1(nn.Module):
    """The CLIP global feature (the class token) projected to the LLaMA width, for every prompt token."""

    def __init__(self, adapter: AdapterArgs, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(adapter.clip_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, clip_dim] -> [B, 1, dim] (broadcast over the prompt tokens)."""
        return self.norm(self.proj(clip_tokens[:, :1].to(self.proj.weight.dtype)))


class VisualPromptGrid(nn.Module):
    """The global feature and the patch tokens pooled to a g x g grid of regions, each projected to the LLaMA
    width: prompt token 0 gets the global feature, token 1 + i region i (row by row). The question's tokens
    then choose which region to read, as they choose among the prompt tokens; v1 gives every prompt token the
    same picture vector whatever the question asks, and v2 first squeezes the tokens through learned queries."""

    def __init__(self, adapter: AdapterArgs, dim: int) -> None:
        super().__init__()
        self.side = grid_side(adapter.prompt_len)
        self.proj = nn.Linear(adapter.clip_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1 + patches, clip_dim] (a square of patches) -> [B, 1 + side * side, dim]."""
        batch, count, width = clip_tokens.shape
        rows = grid_side(count)
        if not rows:
            raise ValueError(f"visual prompt grid: the CLIP tower gives {count - 1} patch tokens, not a square grid")
        clip_tokens = clip_tokens.to(self.proj.weight.dtype)
        grid = clip_tokens[:, 1:].transpose(1, 2).reshape(batch, width, rows, rows)
        regions = nn.functional.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)
        return self.norm(self.proj(torch.cat([clip_tokens[:, :1], regions], dim=1)))


VISUAL_PROMPTS = {"v1": VisualPromptV1, "v2": VisualPromptV2, "grid": VisualPromptGrid}


def build_visual_prompt(adapter: AdapterArgs, dim: int) -> nn.Module:
    return VISUAL_PROMPTS[adapter.visual](adapter, dim)


class ImageEncoder(nn.Module):
    """A frozen open_clip vision tower that returns all its tokens: [B, 1 + patches, output dim]."""

    def __init__(self, tower: nn.Module, name: str) -> None:
        super().__init__()
        for attribute in ("_embeds", "transformer", "ln_post", "image_size"):
            if not hasattr(tower, attribute):
                raise ValueError(f"clip: {name} is not an open_clip VisionTransformer (no {attribute})")
        if getattr(tower, "attn_pool", None) is not None or getattr(tower, "final_ln_after_pool", False) \
                or getattr(tower, "pool_type", "tok") != "tok":
            raise ValueError(f"clip: {name} does not pool with a class token; only such towers are supported")
        self.tower = tower.eval().requires_grad_(False)
        self.name = name
        size = tower.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        proj = getattr(tower, "proj", None)
        self.output_dim = proj.shape[1] if proj is not None else tower.ln_post.normalized_shape[0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        x = tower.ln_post(tower.transformer(tower._embeds(pixels)))
        return x @ tower.proj if tower.proj is not None else x

    def preprocess(self, images: Sequence[Any], channel_order: str = "rgb") -> torch.Tensor:
        """Images (paths, PIL, arrays) -> normalised pixels [B, 3, size, size] in float32."""
        return torch.stack([preprocess(load_image(image), self.image_size, channel_order) for image in images])


def preprocess(image: Image.Image, size: int, channel_order: str = "rgb") -> torch.Tensor:
    """CLIP's transform: bicubic resize of the short side, center crop, to [0, 1], mean/std."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    image = image.resize(new_size, Image.BICUBIC)
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if channel_order == "bgr":
        pixels = pixels.flip(0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def _create_clip(model_name: str, pretrained: str | None, device: str = "cpu"):
    import open_clip

    name = model_name
    if model_name.endswith(".json"):
        config = Path(model_name)
        _check_clip_config(config)  # before open_clip keeps the file: it reads every file it was given at each one
        open_clip.add_model_config(config)
        name = config.stem
    elif ":" not in model_name and model_name not in open_clip.list_models():  # (hf-hub:, local-dir: pass)
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.6)
        raise ValueError(f"clip_model: {model_name!r} is not an open_clip model"
                         + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
                         + "; give one of open_clip.list_models() or a model config .json")
    quiet = _WeightsComeLater() if pretrained is None else None
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as error:
        raise ValueError(f"clip_model: {model_name!r}: {error}") from error
    except Exception as error:  # what open_clip's classes raise on values they do not expect: any kind
        if name == model_name:  # a built-in config: not the user's to mend
            raise
        raise ValueError(f"clip_model: {model_name}: open_clip cannot build a model from this config "
                         f"({type(error).__name__}: {error})") from error
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)


def _check_clip_config(path: Path) -> None:
    """An open_clip model config (.json) checked for what open_clip needs of it to build a model: it skips a file
    without `embed_dim`, `vision_cfg` and `text_cfg` unsaid, and fails on one that is not JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"clip_model: {not_a_file(path)}")
    try:
        config = parsed_json(path.read_text(encoding="utf-8"))
    except ValueError as error:  # (not UTF-8, not JSON, nested too deeply)
        raise ValueError(f"clip_model: {path}: not a JSON model config ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"clip_model: {path}: expected an open_clip model config (a JSON object), got "
                         f"{type(config).__name__}")
    absent = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if absent:
        raise ValueError(f"clip_model: {path}: an open_clip model config needs {', '.join(absent)}")
    if not isinstance(config["vision_cfg"], dict) or not isinstance(config["text_cfg"], dict):
        raise ValueError(f"clip_model: {path}: vision_cfg and text_cfg must be JSON objects")
    embed_dim = config["embed_dim"]
    if type(embed_dim) is not int or embed_dim < 1:
        raise ValueError(f"clip_model: {path}: embed_dim must be a positive whole number, got {embed_dim!r}")


class _WeightsComeLater(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger):
    the caller loads local weights next, so the warning would tell users something untrue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from .formats.common import torch_load

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"clip: {path}: not a readable safetensors file ({error})") from error
    state = torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"clip: {path}: expected a state dict of tensors")
    return state


def tower_shape(model_name: str) -> nn.Module:
    """The vision tower of `model_name` (an open_clip name or a model-config .json) on the meta device: its
    shapes without weights, in milliseconds, to know its memory before anything is fetched (adapter.space_fit)."""
    with torch.device("meta"):
        return _create_clip(model_name, None, device="meta").visual


def _check_tower_state(tower: nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    """Weights that fit the tower of `model_name`, name for name and shape for shape; else what differs (torch's
    own error is a RuntimeError listing every tensor, which for weights of another model is all of them)."""
    own = tower.state_dict()
    absent = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    reshaped = [f"{key} {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in the model"
                for key in own if key in state and state[key].shape != own[key].shape]
    if absent or unexpected or reshaped:
        differences = ([f"missing {absent[:5]}"] if absent else []) + (
            [f"unexpected {unexpected[:5]}"] if unexpected else []) + reshaped[:3]
        raise ValueError(f"clip: {path} does not fit {model_name} (its weights are another model's, or the "
                         f"model is another than its config names): {'; '.join(differences)}")


def load_image_encoder(clip: str | os.PathLike, model_name: str) -> ImageEncoder:
    """The vision tower of `model_name` (an open_clip name or a model-config .json) with weights from a
    local file (a full CLIP or just its `visual.` tensors; safetensors or weights-only torch), or, given
    an open_clip pretrained tag such as "openai", from open_clip's own download (needs network)."""
    path = Path(clip)
    if path.is_dir():  # (was "[Errno 21] Is a directory", naming no flag)
        raise ValueError(f"clip: {path} is a folder; give the CLIP weights file in it (.safetensors, .pt, .bin)")
    if path.exists():
        model = _create_clip(model_name, None)
        state = _read_state(path)
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")} or state
        _check_tower_state(model.visual, visual, path, model_name)
        model.visual.load_state_dict(visual)
        name = f"{model_name} from {path}"
    elif os.sep in str(clip) or str(clip).endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"clip: {missing(path)}")
    else:
        try:
            model = _create_clip(model_name, str(clip))
        except Exception as error:  # offline, unknown tag, ...
            raise ValueError(f"clip: could not get open_clip weights {model_name}/{clip} ({error}); "
                             "pass a local file instead") from error
        name = f"{model_name} ({clip})"
    return ImageEncoder(model.visual, name)


def attach_image_encoder(model: "Transformer", encoder: ImageEncoder, *, inference: bool = False) -> None:
    """Give a model with a visual prompt its (frozen) CLIP tower, after checking they fit together.

    The tower computes in the model's dtype, except on the CPU (float32: no fast half-precision matmuls
    there). With `inference`, the visual prompt does too (in bfloat16 on a GPU, half the memory of its
    float32 weights: 0.11 GiB for the v2 prompt); training leaves it in float32, where the optimizer updates it.
    """
    if model.visual_prompt is None:
        raise ValueError("clip: this adapter has no visual prompt, so it cannot use an image encoder")
    want = model.adapter_args.clip_dim
    if encoder.output_dim != want:
        raise ValueError(f"clip: {encoder.name} gives {encoder.output_dim}-wide features; the adapter reads {want}")
    weight = model.tok_embeddings.weight
    dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
    model.image_encoder = encoder.to(device=weight.device, dtype=dtype)
    if inference:
        model.visual_prompt.to(dtype=dtype)


def _same_image(image: Any) -> Any:
    """What two rows share when they give the same image: the path of a file, else the very object."""
    return ("path", os.fspath(image)) if isinstance(image, (str, os.PathLike)) else ("object", id(image))


def require_sight(model: "Transformer") -> None:
    """A ValueError saying why `model` cannot see an image: no visual prompt, or no CLIP tower loaded."""
    if model.visual_prompt is None:
        raise ValueError("image: this adapter has no visual prompt; it cannot see images")
    if model.image_encoder is None:
        raise ValueError("image: no image encoder is loaded; pass clip=PATH to adapter.load (--clip on the "
                         "command line)")


def encode_images(model: "Transformer", images: Sequence[Any]) -> torch.Tensor | None:
    """The visual prompt of each image ([B, prompt_len | 1, dim]); rows without an image (None) get zeros,
    i.e. no visual query, so text-only and image questions can share a batch. None when no row has one.

    The CLIP tower runs without gradients (it is frozen); the visual prompt keeps them when enabled, so
    training uses this too."""
    require_sight(model)
    present = [i for i, image in enumerate(images) if image is not None]
    if not present:
        return None
    # an image given for several rows (a gate sweep: the same picture at each scale) is read and encoded once
    first: dict[Any, int] = {}
    unique, slot = [], []
    for i in present:
        key = _same_image(images[i])
        if key not in first:
            first[key] = len(unique)
            unique.append(images[i])
        slot.append(first[key])
    model.pack_for_inference()  # a quantized tower's layers too
    encoder = model.image_encoder
    device = model.tok_embeddings.weight.device
    pixels = encoder.preprocess(unique, model.adapter_args.channel_order)
    param = next(encoder.parameters())
    with torch.no_grad():
        tokens = encoder(pixels.to(device=param.device, dtype=param.dtype))
    prompts = model.visual_prompt(tokens).to(device)
    if len(unique) < len(present):
        prompts = prompts[torch.tensor(slot, device=prompts.device)]
    if len(present) == len(images):
        return prompts
    out = prompts.new_zeros(len(images), *prompts.shape[1:])
    out[present] = prompts
    return out
