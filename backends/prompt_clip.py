"""A CLIP model beside the VLM that reads the run's prompt and a clip's frames: how alike the prompt is to each
frame and to each patch, for prompt-guided video methods (Free Video-LLM). The VLM's own encoders (SigLIP,
the Qwen ViT) have no text tower matched to their image features, so a CLIP model gives these signals.

As the official Free Video-LLM code computes them (contrastive/FreeVideoLLM, free_video_llm/llava/model/
multimodal_encoder/clip_encoder.py `CLIPDoubleTower`, llava_arch.py `text_guided_frames` and `roi_crop`):
each frame is squashed to the CLIP tower's square and normalised as its processor does (mm_utils.py
`process_images`, image_aspect_ratio "resize"), the prompt is tokenized as it is (cut at the text tower's
positions, past which the official code fails); a frame's similarity is the cosine of the pooled text and
image embeddings, a patch's the cosine of the pooled text embedding with the patch's last-layer output
through the visual projection (no final layer norm, as there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import transformers  # lazy: its model code loads on first use
from PIL import Image

from .errors import ExplorerError
from .geometry import Geometry
from .loading import LOADING
from .signals import PROMPT_FRAME, PROMPT_PATCH, at


@dataclass(frozen=True)
class PromptClip:
    """A CLIP model (text and vision towers with their projections), its tokenizer and image processor."""

    name: str  # the Hub id or folder it was loaded from
    model: transformers.CLIPModel
    tokenizer: transformers.PreTrainedTokenizerBase
    processor: transformers.CLIPImageProcessor

    @property
    def side(self) -> int:
        """The pixels of the square the vision tower takes."""
        return self.model.config.vision_config.image_size


@dataclass(frozen=True)
class Embedded:
    """The prompt and a clip's frames in CLIP's joint embedding space."""

    text: torch.Tensor  # (D,) float32, the prompt's pooled text embedding
    frames: torch.Tensor  # (F, D) float32, each frame's pooled image embedding
    patches: torch.Tensor  # (F, G, G, D) float32, each patch's last-layer output through the visual projection


@functools.lru_cache(maxsize=2)
def load(name: str, device: torch.device, dtype: torch.dtype) -> PromptClip:
    """The CLIP model `name` (a Hub id or a local folder) on `device`, loaded once."""
    try:
        with LOADING:  # one model built at a time (loading.py)
            model = transformers.CLIPModel.from_pretrained(name, dtype=dtype).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        processor = transformers.CLIPImageProcessor.from_pretrained(name)
    except OSError as error:
        raise ExplorerError(
            f"the CLIP model {name!r} that reads the prompt beside the frames is not on this machine and could not "
            f"be fetched ({str(error).splitlines()[0]}): get it while online with `hf download {name}` (the "
            "official openai/clip-vit-large-patch14-336 is 1.7 GB), or set text_encoder (--set text_encoder=FOLDER) "
            "to a local folder holding a CLIP model"
        ) from None
    return PromptClip(name, model, tokenizer, processor)


def embed(clip: PromptClip, frames: list[Image.Image], prompt: str) -> Embedded:
    """The prompt, each frame and each patch of it in CLIP's embedding space, in one pass of both towers."""
    model, side = clip.model, clip.side
    squashed = [frame.convert("RGB").resize((side, side)) for frame in frames]  # as mm_utils.process_images
    pixels = clip.processor(squashed, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    limit = model.config.text_config.max_position_embeddings  # the official code would fail past it
    text = clip.tokenizer([prompt], truncation=True, max_length=limit, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
        patches = model.visual_projection(out.vision_model_output.last_hidden_state[:, 1:])  # (F, G*G, D)
    grid = side // model.config.vision_config.patch_size
    return Embedded(out.text_embeds[0].float(), out.image_embeds.float(), patches.float().unflatten(1, (grid, grid)))


def on_tokens(e: Embedded, g: Geometry, shown: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) each, float32 on the CPU, NaN outside frames: each visual token's frame's similarity to the prompt
    (the cosine of their pooled embeddings), and its own: the cosine of the prompt's embedding with the mean
    of the patch embeddings under the token's cell, the patch grid pooled onto the partition's grid by area
    (the official code pools them as the features, onto the same grid: llava_arch.py `roi_crop`). A temporal
    group of frames (Qwen2-VL) has the mean of its frames'. `shown[p]`: the frames partition p shows."""
    cosine = torch.nn.functional.cosine_similarity
    frame, patch = torch.full((len(g),), torch.nan), torch.full((len(g),), torch.nan)
    for p, frames in enumerate(shown):
        if not frames:
            continue
        tokens = g.members(p)
        rows, cols = g.grid(p)
        pooled = torch.nn.functional.adaptive_avg_pool2d(e.patches[frames].permute(0, 3, 1, 2), (rows, cols))
        near = cosine(e.text[:, None, None], pooled, dim=1)  # (frames, rows, cols)
        cells = g.cells[tokens] - g.cells[tokens].amin(0)  # (M, 2) from the partition's first cell
        patch[tokens] = near[:, cells[:, 0], cells[:, 1]].mean(0).cpu()
        frame[tokens] = cosine(e.text[None], e.frames[frames], dim=-1).mean().cpu()
    return frame, patch


def signals(names, frames: list[Image.Image], prompt: str, g: Geometry, shown: list[list[int]], device, dtype) -> dict:
    """The prompted signals `names` of a clip ("prompt-frame@<model>", "prompt-patch@<model>", see
    `on_tokens`), each CLIP model loaded once on the VLM's `device` in its `dtype`; `shown` as there."""
    out = {}
    for name in dict.fromkeys(name.partition("@")[2] for name in names):
        frame, patch = on_tokens(embed(load(name, device, dtype), frames, prompt), g, shown)
        out |= {at(PROMPT_FRAME, name): frame, at(PROMPT_PATCH, name): patch}
    return {name: out[name] for name in names}
