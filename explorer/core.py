"""The contracts between backends, methods and the pipeline: budget, signals, selection, method."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch

from backends.encoder_merge import Merging
from backends.errors import ExplorerError
from backends.geometry import Geometry
from backends.signals import (  # the names of the signals methods read
    CLS,
    CLS_0,
    CLS_FEATURE,
    CLS_LAST,
    CLS_LOGITS_LAST,
    CLS_ONEHEAD_LAST,
    FEATURE,
    FEATURES,
    HIDDEN,
    HIDDEN_0,
    HIDDEN_FEATURE,
    KEYS_FEATURE,
    KEYS_LAST,
    LLM_ATTENTION,
    LLM_EMBEDS,
    LLM_HIDDEN,
    LLM_KEYS,
    LLM_LOGITS,
    LLM_POSITIONS,
    LLM_RESIDUAL,
    LLM_ROPE,
    LLM_TRANSITION,
    MERGED_AFTER,
    MERGED_INTO,
    PROMPT_FRAME,
    PROMPT_PATCH,
    ROWS,
    at,
    padded,
    prompted,
    text_of,
)

__all__ = ["Budget", "Cut", "ExplorerError", "Geometry", "Merging", "Method", "Selection", "Signals", "fraction_of"]
__all__ += ["CLS", "CLS_0", "CLS_FEATURE", "CLS_LAST", "CLS_LOGITS_LAST", "CLS_ONEHEAD_LAST", "FEATURE", "FEATURES"]
__all__ += ["HIDDEN", "HIDDEN_0", "HIDDEN_FEATURE", "KEYS_FEATURE", "KEYS_LAST", "LLM_ATTENTION", "LLM_EMBEDS"]
__all__ += ["LLM_HIDDEN", "LLM_KEYS", "LLM_LOGITS", "LLM_POSITIONS", "LLM_ROPE", "LLM_TRANSITION", "MERGED_AFTER"]
__all__ += ["MERGED_INTO", "ROWS", "at", "padded", "text_of"]
__all__ += ["PROMPT_FRAME", "PROMPT_PATCH", "prompted"]
__all__ += ["LLM_RESIDUAL"]


def fraction_of(fraction: float, n: int) -> int:
    """floor(fraction * n) in exact decimal arithmetic, so 0.29 of 100 is 29, not 28."""
    return math.floor(Fraction(str(fraction)) * n)


@dataclass(frozen=True)
class Budget:
    """Visual tokens that reach the LLM: a fraction r of the unreduced count N, or a count of tokens."""

    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.tokens is None):
            raise ExplorerError("give the budget either as a fraction or as a number of tokens")
        if self.fraction is not None and not 0 < self.fraction <= 1:  # also refuses NaN
            raise ExplorerError(f"the budget must be a fraction in (0, 1], got {self.fraction}")
        if self.tokens is not None and self.tokens < 1:
            raise ExplorerError(f"the budget must be at least 1 token, got {self.tokens}")

    def resolve(self, n: int) -> int:
        """The number of tokens to keep out of n."""
        if self.tokens is not None:
            if self.tokens > n:
                raise ExplorerError(f"the budget of {self.tokens} tokens is more than the {n} this image has")
            return self.tokens
        return max(1, fraction_of(self.fraction, n))

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.tokens} tokens"


@dataclass(frozen=True)
class Signals:
    """What a method may read: the geometry, its budget, and the signals it asked for by name.

    Names are <kind>@<layer>, where <layer> is a vision encoder layer (0 = first), "feature" (the
    layer whose output the LLM receives), "feature-<k>" (k layers below it) or "last"; each is in LLM order, NaN where a token has none
    (newlines):
    - "cls@<layer>": the [CLS]-to-patch attention, heads summed, (N,) on the CPU;
    - "cls-heads@<layer>": the same per head, (N, heads), on the model's device;
    - "cls-onehead@<layer>": the same with the heads joined into one head over all channels (PruMerge);
    - "cls-logits@<layer>": the [CLS] row of q.k * scale before the softmax, heads averaged (GlobalCom2);
    - "keys@<layer>": the keys, (N, heads, head_dim), on the model's device;
    - "hidden@<layer>": the layer's output, (N, C), on the model's device; "hidden@feature" is what the
      projector turns into the LLM's input;
    and "features": the (N, D) projected features the LLM receives, newlines included, on the model's
    device. "padded <name>" (`padded`) is such a signal at every position of every crop the encoder saw,
    the thumbnail first, padding included, as the official LLaVA code ranks them: (crops, T', ...), T'
    positions per crop in raster order, attention on the CPU; "encoder rows" (`ROWS`), (N,) long, is each
    visual token's row in those flattened (crops * T'), -1 for none (newlines). Positions that unpadding
    removed are no visual token and cannot be kept. Only families whose every visual token is one
    encoder patch give them (LLaVA-NeXT, LLaVA-1.5, LLaVA-OneVision unless it resamples the grid). A backend that cannot give a signal raises ExplorerError naming it. A method that merges
    inside the encoder (`merging`) reads what that pass gives instead: "hidden@feature" with every
    token carrying its merged row, "merged into" and "merged after" (see `Backend.merged`).

    Encoders without a [CLS] token (SigLIP in LLaVA-OneVision and SmolVLM, the Qwen2-VL ViT) give, as
    community ports do, the attention each patch receives instead: "cls" is its mean over heads and
    over the queries that attend to it (the whole crop, or a Qwen2.5-VL window), "cls-heads" per
    head, "cls-onehead" with the heads joined into one, "cls-logits" the scores before the softmax,
    averaged the same way. Where the model folds several patches into one token (Qwen2-VL's 2x2
    merger, SmolVLM's 4x4 pixel shuffle), attention and keys are the mean over the token's patches
    and "hidden" holds them side by side, (N, patches * C), as the projector takes them; where it
    resamples the grid (LLaVA-OneVision's anyres_max_9), signals are resampled as the features are.

    Inside the LLM (stage "llm"), at a cut, with rows of tokens cut earlier NaN and "text" the T
    prompt tokens after the image (the last one is the last prompt token), on the model's device:
    - "llm-attention": (H, T, N), each text token's attention to each visual token at the scoring
      layer, per head, softmax over all its keys;
    - "llm-keys": (N, C), that layer's keys after RoPE, heads concatenated ("llm-text-keys": (T, C));
    - "llm-hidden": (N, D), the hidden states entering the cut layer, through the model's final norm
      ("llm-text-hidden": (T, D));
    - "llm-residual": (N, D), the same as they are, not normalised: what a merge at the cut mixes
      (`Selection.mixes`; "llm-text-residual": (T, D));
    - "llm-embeds": (N, D), the LLM's input embeddings ("llm-text-embeds": (T, D));
    - "llm-transition": (N,), TransPrune's token transition variation summed over the attention and
      MLP of every layer from the one before the first cut to the one before this cut ("llm-text-transition": (T,));
    - "llm-rope": (T, N), the logits all-ones queries and keys would give after RoPE, q.k / sqrt(head_dim),
      from each text token to each visual token at their current positions (SparseVLM v2.0's correction);
    - "llm-positions": (N,) long, the visual tokens' positions in the prompt (-1 for tokens gone before the
      LLM; "llm-text-positions": (T,)).
    A method whose `early_layer` asks for a first pass through the LLM's first layers reads, beside its
    vision signals, "llm-logits": (H, L), the last prompt token's query times the key of every prompt token
    at that layer, after RoPE, unscaled, per head, in prompt order, and "llm-positions".

    On a clip, a CLIP model beside the VLM reads the prompt and the frames (`backends.prompt_clip`; the
    VLM's own encoders have no matched text tower), named after the @ (a Hub id or a local folder), (N,)
    on the CPU, NaN outside frames: "prompt-frame@<model>", each token's frame's similarity to the prompt
    (cosine of the pooled text and image embeddings; a temporal group: its frames' mean), and
    "prompt-patch@<model>", the token's own: the prompt's embedding against the projected patch
    embeddings pooled onto the token's cell (`prompted` tells these names). They are the method's own time.
    """

    geometry: Geometry
    budget: int  # B: visual tokens to keep (inside the LLM: left after this cut; before it: see `entering`)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    alive: torch.Tensor | None = None  # (N,) bool, inside the LLM: the tokens still in the sequence

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.maps[name]


@dataclass(frozen=True)
class Cut:
    """Where a method working inside the LLM cuts: before `layer`, scored at `score_layer` (that layer
    or the one before), leaving `tokens` visual tokens."""

    layer: int
    score_layer: int
    tokens: int


@dataclass(frozen=True)
class Selection:
    """What a method returns."""

    keep: torch.Tensor  # (K,) long: sorted, unique indices into the N visual tokens
    scores: torch.Tensor | None = None  # (N,) the method's per-token score for the heatmap, NaN where none
    # (N,) long, for merging methods: the token (index into N) each token was merged into; kept tokens
    # point at themselves, tokens dropped without merging are -1
    groups: torch.Tensor | None = None
    # (K, N) sparse float on the CPU, for merging methods: kept token keep[k] reaches the LLM as the
    # projection of sum_j weights[k, j] * hidden_j, hidden = the "hidden@feature" signal (which such a
    # method asks for); None: every kept token as it is
    weights: torch.Tensor | None = None
    # what `weights` mix: "hidden", the encoder outputs before the projector (VisionZip, PruMerge, ToMe: the
    # projector's MLP would not commute with the mean), or "features", the projected features the LLM
    # receives (the video methods that merge after the projector: HoliTom, FastVID, DyCoke); at a cut inside the
    # LLM, "llm-residual": keep[k] enters the next layers as sum_j weights[k, j] * h_j, h the hidden states
    # entering the cut layer as they are ("llm-residual"), j the tokens alive at the cut (HoliTom's merge there)
    mixes: str = "hidden"
    budgets: dict[str, int] = field(default_factory=dict)  # partition name -> its budget
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # intermediate (N,) maps worth teaching
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. {"content count": {"crop 0,0": 12}}
    # a stat keyed by a clip's frame (partition) names is a per-frame fact the frame strip shows beside the frame;
    # stats["segment"] {frame name: index} marks the runs of consecutive frames a video method treats together
    # (FastVID's DySeg segments, HoliTom's windows, DyCoke's windows of 4), drawn as bands under the strip


class Method:
    """A reduction method: one file each in `explorer.methods`, all listed there.

    A method is a frozen dataclass subclassing this one, whose fields are its settings (metadata:
    "help", and "range" for numbers); class attributes say its `stage` ("vision": before the LLM), the
    signals it `needs` (see `Signals`), optionally what it `requires` of the model ("thumbnail": a
    low-resolution view of the whole image beside high-resolution crops; "patch tokens": every visual
    token one encoder patch, projected on its own), and a one-line `summary`; `select(signals) ->
    Selection` does the work. A vision method that merges inside the encoder also has `merging(geometry,
    budget) -> Merging`, the plan the backend's encoder follows; its `select` then reads the signals that
    merging gives. A method that keeps every token whatever the budget is not `budgeted`. On a video clip
    an image method's selection runs frame by frame, each frame with its share of the budget
    (`engine.clips.per_frame`); a method that reads the whole clip says `on_clips = "clip"`.

    A method of stage "llm" prunes inside the LLM: `cuts(depth, n, budget) -> list[Cut]` says before
    which layers it cuts and how many tokens each cut leaves (the last leaves `budget`), its
    `keep_positions` setting whether kept tokens keep their positions, and `select` is called at each cut
    with the signals of that point (`Signals.alive` marks the tokens still in the sequence); a cut may
    also merge, its selection's `weights` with `mixes = "llm-residual"` mixing the hidden states there
    into the kept tokens, and its `groups` saying where each went (HoliTom). Its budget
    B is, by default, the mean number of visual tokens over the LLM's layers, as the papers count it
    (`explorer.engine.llm.plan`: the last cut's count whose cuts make that mean at most B, or the method's own
    `mean_cuts(depth, n, budget)`); with its `budget_after_cuts` setting B is what the last cut leaves.
    Such a method may also act before the LLM: `select_vision(signals) -> Selection`, on the vision
    signals it names in `vision_needs`, keeps (and may merge) tokens as a vision method does; only those
    enter the LLM, its cuts are counted from them, and the maps of that selection (e.g. a set never to
    drop) reach every cut's signals; `entering(n, budget)` says at most how many it leaves when its last
    cut leaves `budget`. An `adaptive` method keeps what its rule finds, at most each cut's count. A
    method whose decode works on a smaller cache than its prefill filled says from which layer on the
    caches are cut down to the last cut's tokens once the prefill is over: `compact_from(cuts) -> int |
    None` (MustDrop's decode stage; without it every layer keeps the cache its prefill filled). A method
    that chooses again at every decode step which visual tokens the layers from its last cut on attend to
    (DyCoke's decode stage) has `decode_keep(signals, previous) -> Tensor | None`: `signals` hold
    "llm-attention", (H, 1, N), the new token's attention at the last cut's scoring layer, `previous` the
    signals of the step before (None at the first); it returns the (K,) sorted indices into N of the
    tokens to attend to in this step, or None for all of them; the caches keep every token. With
    `rerank` the decode runs without a KV cache: every generated token reruns the whole sequence, and the
    method chooses again in each pass, its text then ending with the newest token (FastV's accuracy mode).

    A vision method may read a first pass through the LLM's first layers, on every visual token, before
    the real prefill on the kept ones (GemFilter): `early_layer(depth) -> int` names the layer of an LLM of
    `depth` layers whose signals `select` reads ("llm-logits", "llm-positions"); that pass is the
    method's own time (`selection_s`).

    Every attribute below but `summary` has its default here; a method overrides only what it uses.
    """

    stage: ClassVar[str] = "vision"  # "vision": before the LLM; "llm": inside it
    summary: ClassVar[str]  # one line, for pickers and `python -m explorer methods`
    needs: ClassVar[tuple[str, ...]] = ()  # the signals `select` reads
    requires: ClassVar[tuple[str, ...]] = ()  # "thumbnail", "patch tokens", "clip" (a video's frames)
    on_clips: ClassVar[str] = "per frame"  # on a video: "per frame" (an image method) or "clip" (it reads them all)
    budgeted: ClassVar[bool] = True  # False: it keeps every token whatever the budget
    vision_needs: ClassVar[tuple[str, ...]] = ()  # the vision signals `select_vision` reads
    adaptive: bool = False  # it picks its own count (a setting where a method offers it)
    keep_positions: bool = True  # stage "llm": kept tokens keep their positions (a setting of those methods)
    budget_after_cuts: bool = False  # stage "llm": B is what the last cut leaves, not the layer mean (a setting)
    rerank: bool = False  # stage "llm": decode without a KV cache, choosing again at every token (FastV's setting)
    select_vision: Callable[[Signals], Selection] | None = None  # stage "llm": a step before the LLM
    merging: Callable[[Geometry, int], Merging] | None = None  # merging inside the vision encoder
    compact_from: Callable[[list[Cut]], int | None] | None = None  # stage "llm": caches cut after the prefill
    decode_keep: Callable[[Signals, Signals | None], torch.Tensor | None] | None = None  # stage "llm": per decode step
    mean_cuts: Callable[[int, int, int], list[Cut]] | None = None  # stage "llm": its own cuts for a layer mean B
    early_layer: Callable[[int], int] | None = None  # a first pass through the LLM up to this layer (GemFilter)

    def select(self, s: Signals) -> Selection:
        """The tokens to keep (stage "llm": at this cut)."""
        raise NotImplementedError

    def cuts(self, depth: int, n: int, budget: int) -> list[Cut]:
        """Stage "llm": before which of the LLM's `depth` layers it cuts and how many of the `n` visual
        tokens each cut leaves, the last `budget`."""
        raise NotImplementedError

    def entering(self, n: int, budget: int) -> int:
        """Stage "llm": at most how many of the `n` visual tokens enter the LLM when its last cut leaves
        `budget` (fewer than n only for a step before the LLM that always keeps a set count)."""
        return n
