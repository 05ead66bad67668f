"""Dataclass configs and named presets.

A config fully describes a model's architecture; it is saved as ``config.json`` in every checkpoint.
Presets: ``tiny`` (tests), ``synth-small`` (the embedded default), ``base`` (ViT-B/16 @384 + 6-layer
768-d decoder, the paper's BERT variant without SAM), and ``hf:<vision>+<lm>`` builders.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PixelLLMError

CONFIG_VERSION = 1
MAX_MASK_OUTPUTS = 8  # heads.mask_decoder


@dataclass
class VisionConfig:
    kind: str = "vit"  # "vit" (built in) | "hf" (any Hugging Face vision tower through AutoModel)
    image_size: int = 384  # square canvas; the longer side is resized to this and the rest zero-padded
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    conv_stem: bool = False  # a small conv stem before patchify: learns much faster from scratch
    # Beyond the paper: a conv branch on the stem's finest map (stride patch/2) whose d channels travel
    # inside each image token as its 2x2 sub-patches (4*d more channels per token). Shapes of small objects
    # live at that resolution; the proposal head unpacks them to its 2x finer map. 0 = plain tokens.
    detail_channels: int = 0
    # Beyond the paper: a conv branch on the stem's stride-4 map (d channels; needs conv_stem).
    # It does not join the image tokens: it is cached next to them with the proposal maps, and prompt.fine_grid
    # samples it inside each prompt box (the shape of an object a dozen pixels wide). 0 = none.
    fine_channels: int = 0
    drop_path: float = 0.0
    hf_name_or_path: str | None = None
    freeze: bool = False
    pixel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP
    pixel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PromptConfig:
    """Prompt encoder (random-Fourier PE of box corners) + prompt adapter (two-way transformer)."""

    embed_dim: int = 256  # Fourier PE width (SAM: 256)
    hidden_size: int = 512  # adapter width
    depth: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample: int = 2
    num_queries: int = 32  # visual tokens per prompt handed to the language model
    output_dim: int = 1024  # per-query projection (each query has its own Linear)
    # Beyond the paper: bilinear samples of the image features on a roi_grid x roi_grid lattice inside the
    # prompt box join the prompt tokens, so box-local content reaches the queries from the first step.
    # 0 = paper-exact (no RoI sampling). Small models trained from scratch learn region tasks much faster.
    roi_grid: int = 0
    # Beyond the paper: g x g bilinear samples of the proposal head's feature map inside the prompt box,
    # projected, join the LM's visual tokens directly (g*g more tokens). Needs heads.proposals. The map
    # is finer than the image tokens and, with the grid point head, learns object attributes early, so
    # region captions read them in one hop. 0 = paper-exact.
    map_tokens: int = 0
    # Beyond the paper: g x g bilinear samples of the vision encoder's stride-4 fine map (vision.fine_channels)
    # inside the prompt box, projected by a zero-initialised layer and added to the map tokens (needs
    # map_tokens): adding it to a trained model changes nothing until it is trained. 0 = none.
    fine_grid: int = 0
    # Beyond the paper: the prompt box's place and size relative to the image it lies in (not the padded
    # canvas), through a zero-initialised MLP added to every visual token. "small" and "large" are relative
    # to the image, and a non-square image is padded to the square canvas, so neither the box corners
    # (canvas frame) nor the image tokens say how large the box is for its image. False = paper-exact.
    box_extent: bool = False
    # Point prompts (SAM's): Fourier PE of a point plus a learned positive / negative embedding, next to the
    # box's tokens wherever a prompt is read (the prompt adapter and the mask decoder). Adds two parameters
    # to the prompt encoder (``point_embed``, ``not_a_point_embed``); without points given, every output is
    # exactly as without the option. False = box prompts only.
    points: bool = False
    # Beyond the paper: the prompt box's pixels, cut out as a square around the box (a fifth wider than its
    # longer side, so a shape keeps its proportions) and resampled to zoom x zoom, through a small CNN and a
    # zero-initialised layer added to the map tokens (needs map_tokens). A small object covers one or two
    # image tokens; zoomed in, its outline is what the CNN sees. Growing it onto a trained model changes
    # nothing until it is trained. 0 = none.
    zoom: int = 0
    # Beyond the paper, with zoom and heads.box_words: how strongly the zoom's own word head (trained on the
    # words of each box's text) votes while a region caption is written: each step adds zoom_words times
    # its log-probability of every word, relative to its favourite and floored, to the language model's
    # (the end of the text and an adapter's new words get no vote), so a shape the CNN reads plainly is not
    # overruled by a blurred map token (``modeling/extensions/zoom.py``). Inference only; 0 = none.
    zoom_words: float = 0.0
    # With zoom_words: the views of each region's crop whose word-head log-probabilities the caption vote
    # averages: 1 (the crop), 2 (and its mirror image), 4 (its quarter turns) or 8 (both). No shape's name
    # changes under them, and a view the head reads well outvotes one it reads badly. (heads.candidate_words
    # reads one view: eight a candidate cost refer more than it gained.)
    zoom_views: int = 1


@dataclass
class LanguageConfig:
    kind: str = "git"  # "git" (built-in prefix decoder) | "hf-causal" | "hf-seq2seq"
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 256
    dropout: float = 0.1
    vocab_size: int = 0  # filled from the tokenizer when 0
    hf_name_or_path: str | None = None
    # LoRA (peft). r == 0 means the LM is trained fully (or frozen when freeze=True).
    lora_r: int = 0
    lora_alpha: int = 0  # the paper's scale 2 with no division by rank: alpha = 2 * r (0 -> 2 * r)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None -> chosen per architecture (q,v / c_attn / ...)
    freeze: bool = False
    max_context_tokens: int = 24
    max_text_tokens: int = 48


@dataclass
class HeadsConfig:
    point_hidden: int = 512
    point_layers: int = 3
    num_points: int = 2  # per token: box corners (x0, y0), (x1, y1)
    # "mlp": the paper's MLP on the token's hidden state. "grid" (ours): the token points at a cell of
    # the proposal map and takes the box that cell proposes (modeling/extensions/grid_pointing.py); needs
    # proposals and num_points 2. Small models trained from scratch localise far sooner with it.
    point_mode: str = "mlp"
    # Ours, grid point head only: the 8 strongest candidates of each row pass through ``relation_layers``
    # transformer layers (self-attention among candidates with their boxes, cross-attention to the row's
    # text) before the tokens score them, so "the star above the red square" and "the leftmost circle" can
    # compare objects. 0 = each candidate is scored on its own.
    relation_layers: int = 0
    # Ours, with relation_layers: each of those candidates also brings its own box's pixels, zoomed in to
    # candidate_zoom x candidate_zoom (``modeling/extensions/zoom.py``, through a zero-started layer), so
    # "the pentagon" can be told from "the hexagon" where the map features of small objects blur. 0 = none.
    candidate_zoom: int = 0
    # Ours, with the grid point head, prompt.zoom and box_words: when a text is localised, the zoom's word
    # head reads each of the 8 candidates' boxes and votes for the candidates that show the text's words:
    # candidate_words times the mean, over the words it sees on some candidate, of each candidate's
    # log-probability minus the best candidate's (floored), added to the candidates' scores
    # (``PixelLLM.refer_word_vote``). Inference only, for referring texts; 0 = none.
    candidate_words: float = 0.0
    # Ours, grid point head only: ``point_context_layers`` bidirectional self-attention layers over the
    # row's token states form the pointing queries, so a word's point may depend on the words after it
    # (a trace puts "a small" on the object the phrase goes on to name; the causal LM cannot know it yet).
    # ``point_refine``: a per-token correction of the picked box (a trace loop is smaller than its object).
    # ``point_coords``: a token may also score candidates linearly by their centre's x and y, which is
    # what "the leftmost ..." asks of the candidates that match the rest of the phrase.
    point_context_layers: int = 0
    point_refine: bool = False
    point_coords: bool = False
    # Ours: a linear word head on the proposal features inside a target box, trained to predict the words
    # of that box's region caption or referring expression (losses.box_words_loss). Needs proposals. It
    # teaches the features object attributes directly, which the grid point head and map tokens read.
    box_words: bool = False
    confidence: bool = True  # per-token head predicting the IoU of the token's box (our addition)
    proposals: bool = True  # CenterNet-style class-agnostic proposal head for dense captioning
    proposal_hidden: int = 256
    max_proposals: int = 100
    # Referring segmentation (SAM's mask decoder, ``modeling/mask_decoder.py``): the number K of mask
    # outputs per prompt (K mask tokens and an IoU token through a two-way transformer with the prompt's
    # tokens; masks at stride 4 on the canvas, each with a predicted IoU). 0 = no mask decoder.
    mask_decoder: int = 0
    # Channels of the mask refiner (``modeling/mask_refiner.py``): the decoder's stride-4 masks sharpened on
    # the canvas pixels to stride 1, trained at stride 1. 0 = masks stay at stride 4.
    mask_refine: int = 0


@dataclass
class LossConfig:
    label_smoothing: float = 0.1
    text_weight: float = 1.0
    point_weight: float = 5.0  # L1 on points normalised by the un-padded image size
    confidence_weight: float = 1.0
    detection_weight: float = 1.0
    pointer_weight: float = 1.0  # grid point head only: cross-entropy toward the best-matching candidate
    box_words_weight: float = 1.0  # heads.box_words only
    # heads.mask_decoder only, SAM's 20:1:1: focal and dice of the best of the K masks, MSE of the
    # predicted IoU against each mask's real IoU
    mask_focal_weight: float = 20.0
    mask_dice_weight: float = 1.0
    mask_iou_weight: float = 1.0


@dataclass
class PromptTemplates:
    refer_prefix: str = "where is "
    region_prompt: str = "an object of "
    caption_prompt: str = "a long image caption: "


@dataclass
class PixelLLMConfig:
    preset: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    templates: PromptTemplates = field(default_factory=PromptTemplates)
    config_version: int = CONFIG_VERSION

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelLLMConfig:
        def build(klass, values):
            names = {f.name for f in dataclasses.fields(klass)}
            values = {k: v for k, v in values.items() if not (k in RETIRED and v == RETIRED[k])}
            unknown = set(values) - names
            if unknown:
                raise CheckpointError(f"config for {klass.__name__} has unknown keys {sorted(unknown)}; "
                                      "was it written by a newer pixelllm-plugins?")
            kwargs = {}
            for f in dataclasses.fields(klass):
                if f.name not in values:
                    continue
                v = values[f.name]
                if f.name == "pixel_mean" or f.name == "pixel_std":
                    v = tuple(v)
                kwargs[f.name] = v
            return klass(**kwargs)

        data = dict(data)
        sub = {"vision": VisionConfig, "prompt": PromptConfig, "language": LanguageConfig,
               "heads": HeadsConfig, "loss": LossConfig, "templates": PromptTemplates}
        for key, klass in sub.items():
            if key in data:
                data[key] = build(klass, data[key])
        return build(cls, data)

    # ---- checks across sections ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``PixelLLMError`` when an option needs a part that this config turns off (``PixelLLM``
        calls it before building anything). The vision encoder checks its own options when built."""
        vision, prompt, heads = self.vision, self.prompt, self.heads
        if prompt.map_tokens > 0 and not heads.proposals:
            raise PixelLLMError("prompt.map_tokens samples the proposal head's features: it needs "
                                "heads.proposals true")
        if vision.fine_channels and vision.kind != "vit":
            raise PixelLLMError("vision.fine_channels needs the built-in ViT (vision.kind 'vit')")
        if prompt.fine_grid > 0 and (not vision.fine_channels or prompt.map_tokens <= 0):
            raise PixelLLMError("prompt.fine_grid adds samples of the fine map to the map tokens: it needs "
                                "vision.fine_channels > 0 and prompt.map_tokens > 0")
        if prompt.zoom and (prompt.map_tokens <= 0 or prompt.zoom < 8 or prompt.zoom % 8):
            raise PixelLLMError("prompt.zoom adds the zoomed-in box to the map tokens: it needs "
                                "prompt.map_tokens > 0 and a crop size that is a multiple of 8 (e.g. 32)")
        if prompt.zoom_words and (not prompt.zoom or not heads.box_words or prompt.zoom_words < 0
                                  or not math.isfinite(prompt.zoom_words)):
            raise PixelLLMError(f"prompt.zoom_words is the zoom's word head's vote in region captions: it needs "
                                f"prompt.zoom > 0, heads.box_words (the head trains with it) and a finite "
                                f"weight >= 0, got {prompt.zoom_words}")
        if prompt.zoom_views not in (1, 2, 4, 8):
            raise PixelLLMError(f"prompt.zoom_views is how many views of a crop the caption vote averages: 1, 2 "
                                f"(with its mirror image), 4 (its quarter turns) or 8 (both), got {prompt.zoom_views}")
        if heads.candidate_words and (heads.point_mode != "grid" or not prompt.zoom or not heads.box_words
                                      or heads.candidate_words < 0 or not math.isfinite(heads.candidate_words)):
            raise PixelLLMError(f"heads.candidate_words is the zoom's word head's vote on which candidate a text "
                                f"names: it needs heads.point_mode 'grid', prompt.zoom > 0, heads.box_words and a "
                                f"finite weight >= 0, got {heads.candidate_words}")
        if heads.box_words and not heads.proposals:
            raise PixelLLMError("heads.box_words reads the proposal head's features: it needs "
                                "heads.proposals")
        if heads.point_mode == "grid":
            if not heads.proposals or heads.num_points != 2:
                raise PixelLLMError("heads.point_mode 'grid' points at proposal-map cells: it needs "
                                    "heads.proposals true and heads.num_points 2")
        elif heads.point_mode == "mlp":
            if heads.point_context_layers or heads.point_refine or heads.point_coords:
                raise PixelLLMError("heads.point_context_layers, point_refine and point_coords belong to the "
                                    "grid point head: set heads.point_mode 'grid' or leave them at 0 / false")
        else:
            raise PixelLLMError(f"unknown heads.point_mode {heads.point_mode!r}; use 'mlp' or 'grid'")
        if heads.candidate_zoom and (heads.point_mode != "grid" or heads.relation_layers <= 0
                                     or heads.candidate_zoom < 8 or heads.candidate_zoom % 8):
            raise PixelLLMError("heads.candidate_zoom adds each compared candidate's zoomed-in box to the relation "
                                "layers: it needs heads.point_mode 'grid', heads.relation_layers > 0 and a crop "
                                "size that is a multiple of 8 (e.g. 32)")
        if heads.mask_decoder < 0 or heads.mask_decoder > MAX_MASK_OUTPUTS:
            raise PixelLLMError(f"heads.mask_decoder is the number of mask outputs per prompt: 0 (none) to "
                                f"{MAX_MASK_OUTPUTS}, got {heads.mask_decoder}")
        if heads.mask_refine < 0 or (heads.mask_refine and not heads.mask_decoder):
            raise PixelLLMError(f"heads.mask_refine is the mask refiner's channels (0: none) and refines the mask "
                                f"decoder's masks: it needs heads.mask_decoder > 0, got mask_refine "
                                f"{heads.mask_refine} with mask_decoder {heads.mask_decoder}")
        if heads.mask_decoder and vision.image_size % 4:
            raise PixelLLMError(f"heads.mask_decoder predicts masks at stride 4: vision.image_size must be "
                                f"divisible by 4, got {vision.image_size}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PixelLLMConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read model config {path}: {exc}") from exc


# Options that no preset or shipped checkpoint used, since removed: a config that sets one to this
# value (its old default) still loads; any other value is an unknown key. relation_candidates: how many
# candidates the relation layers compare, now GridPointHead.relation_candidates (8).
RETIRED = {"stem_blocks": 0, "candidate_fine_grid": 0, "relation_candidates": 8}


# ---- presets -----------------------------------------------------------------------------------

def _tiny() -> PixelLLMConfig:
    return PixelLLMConfig(
        preset="tiny",
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                            conv_stem=True),
        prompt=PromptConfig(embed_dim=32, hidden_size=32, depth=1, num_heads=2, mlp_dim=64,
                            attention_downsample=1, num_queries=4, output_dim=32, roi_grid=2),
        language=LanguageConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_positions=96, dropout=0.0, max_context_tokens=16, max_text_tokens=24),
        heads=HeadsConfig(point_hidden=32, point_layers=2, proposal_hidden=32, max_proposals=20),
    )


def _synth_small() -> PixelLLMConfig:
    return PixelLLMConfig(
        preset="synth-small",
        vision=VisionConfig(image_size=192, patch_size=16, hidden_size=192, num_layers=4, num_heads=3,
                            conv_stem=True, detail_channels=16, fine_channels=16),
        prompt=PromptConfig(embed_dim=64, hidden_size=128, depth=2, num_heads=4, mlp_dim=256,
                            attention_downsample=1, num_queries=8, output_dim=192, roi_grid=3, map_tokens=2,
                            fine_grid=4, box_extent=True, points=True, zoom=32, zoom_words=1.0,
                            zoom_views=8),
        language=LanguageConfig(hidden_size=192, num_layers=3, num_heads=4, intermediate_size=512,
                                max_positions=128, dropout=0.0, max_context_tokens=24, max_text_tokens=40),
        heads=HeadsConfig(point_hidden=192, point_layers=3, proposal_hidden=128, max_proposals=30,
                          point_mode="grid", box_words=True, relation_layers=2, point_context_layers=1,
                          point_refine=True, point_coords=True, mask_decoder=3, mask_refine=8, candidate_zoom=32,
                          candidate_words=1.0),
    )


def _base() -> PixelLLMConfig:
    return PixelLLMConfig(
        preset="base",
        vision=VisionConfig(image_size=384, patch_size=16, hidden_size=768, num_layers=12, num_heads=12),
        prompt=PromptConfig(),
        language=LanguageConfig(max_positions=256, max_context_tokens=40, max_text_tokens=128),
        heads=HeadsConfig(),
    )


PRESETS = {"tiny": _tiny, "synth-small": _synth_small, "base": _base}


def hf_config(vision: str, language: str, *, seq2seq: bool | None = None, lora_r: int = 32,
              image_size: int = 384) -> PixelLLMConfig:
    """Any Hugging Face vision tower + language model (by hub id or local path).

    ``seq2seq`` defaults to True when the LM name mentions t5. The LM is frozen with LoRA (rank 32,
    alpha = 2r: the paper's T5 recipe).
    """
    if seq2seq is None:
        seq2seq = "t5" in language.lower()
    return PixelLLMConfig(
        preset=f"hf:{vision}+{language}",
        vision=VisionConfig(kind="hf", hf_name_or_path=vision, image_size=image_size),
        prompt=PromptConfig(),
        language=LanguageConfig(kind="hf-seq2seq" if seq2seq else "hf-causal", hf_name_or_path=language,
                                lora_r=lora_r, lora_alpha=2 * lora_r, freeze=True,
                                max_context_tokens=40, max_text_tokens=128),
        heads=HeadsConfig(),
    )


def get_preset(name: str) -> PixelLLMConfig:
    """Return a fresh config for a preset name (``tiny``, ``synth-small``, ``base``, ``hf:VISION+LM``)."""
    if name.startswith("hf:"):
        body = name[3:]
        if "+" not in body:
            raise CheckpointError(f"hf preset must look like 'hf:VISION+LM', got {name!r}")
        vision, language = body.split("+", 1)
        return hf_config(vision, language)
    try:
        return PRESETS[name]()
    except KeyError:
        raise CheckpointError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or 'hf:VISION+LM'"
        ) from None
