"""PMF (Li et al., "Efficient Multimodal Fusion via Interactive Prompting", CVPR 2023) on a frozen dual encoder.

Rebuilt from the facts in shared/design/method.md (the public code's structure), on top of this project's lock-step
scheduler (`peft_mitp.lockstep.run_lockstep`) so that it runs on every dual encoder MITP runs on, with each family's
stock tower forwards:

- The last `fusion_layers` (default 2) layers of each tower are fusion layers; the layers below run frozen and
  without autograd (nothing below the first fusion layer is trainable).
- Each fusion layer k of each tower has three prompt sets of length `prompt_length` (default 4), drawn from
  N(0, 0.02): query prompts Q, query-context prompts QC and fusion-context prompts FC.
- Each fusion layer runs twice:
  1. query pass: `layer([h; Q; QC])`; the outputs at the Q positions are the tower's queries. The token outputs of
     this pass are thrown away.
  2. fusion pass: `layer([h; T(queries of the other tower); FC])`, where T is a 2-layer MLP translator (per fusion
     layer and direction; hidden width 384 for width-768 towers, scaled to `width / 2` here); the token outputs of
     this pass continue up the tower, the prompt positions are dropped.
- Head: a linear head on the pooled text feature and one on the pooled image feature after a LayerNorm; their logits
  are averaged.

With BERT-base + ViT-B/16 and 101 classes this has about 2.5M trainable parameters (`benchmarks/paper_scale.py`
counts them), as computed from PMF's code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_mitp.families import family_for, pooled, resolve_tower
from peft_mitp.hub import HubOutput, ModalityPresence
from peft_mitp.lockstep import current_tower, run_lockstep
from peft_mitp.prompt_mask import extend_attention_mask

from .common import classification_output, init_linear, split_inputs

__all__ = ["PMFExchange", "PMFForImageTextClassification", "PMFLayer"]


class PMFExchange(nn.Module):
    """The translators of one fusion layer: each tower's queries, mapped into the other tower's width.

    The lock-step scheduler calls it like MITP's memory hub, with both towers' query read-outs of the fusion layer,
    and hands each tower what it returns for its fusion pass.

    Args:
        text_width: hidden width of the text tower.
        vision_width: hidden width of the vision tower.
        hidden: width of the translators' hidden layer.
    """

    def __init__(self, text_width: int, vision_width: int, hidden: int) -> None:
        super().__init__()
        self.text_to_vision = nn.Sequential(nn.Linear(text_width, hidden), nn.GELU(), nn.Linear(hidden, vision_width))
        self.vision_to_text = nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, text_width))

    def resolve_presence(self, presence: ModalityPresence | None, batch_size: int) -> ModalityPresence | None:
        """PMF has no stand-ins for a missing modality: every sample needs both."""
        if presence is not None:
            raise ValueError("PMF needs both modalities for every sample.")
        return None

    def forward(self, text_queries: torch.Tensor, vision_queries: torch.Tensor) -> HubOutput:
        """(B, P, d_text) and (B, P, d_vision) queries -> what each tower appends in its fusion pass."""
        return HubOutput(
            text_prompts=self.vision_to_text(vision_queries.to(self.vision_to_text[0].weight.dtype)),
            vision_prompts=self.text_to_vision(text_queries.to(self.text_to_vision[0].weight.dtype)),
        )


class PMFLayer(nn.Module):
    """One fusion layer of one tower: the wrapped frozen layer, run twice (query pass, fusion pass) with prompts.

    Only works inside `run_lockstep` (which `PMFForImageTextClassification.forward` sets up). The wrapped layer must
    be called as `layer(hidden_states, attention_mask, ...)`, as the encoders of BERT, ViT-style towers and CLIP do.

    Args:
        base_layer: the frozen encoder layer.
        index: k, the layer's position among the fusion layers (0 = the lowest).
        width: the tower's hidden width.
        prompt_length: length of each prompt set.
        exchange: the `PMFExchange` of this fusion layer (held by reference, registered on the task model).
        init_std: standard deviation of the prompts' Gaussian initialisation.
    """

    def __init__(
        self, base_layer: nn.Module, index: int, width: int, prompt_length: int, exchange: PMFExchange, init_std: float
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.query = nn.Parameter(torch.randn(prompt_length, width) * init_std)
        self.query_context = nn.Parameter(torch.randn(prompt_length, width) * init_std)
        self.fusion_context = nn.Parameter(torch.randn(prompt_length, width) * init_std)
        object.__setattr__(self, "_exchange", exchange)

    def _run(self, hidden: torch.Tensor, extra: torch.Tensor, tower: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """The wrapped layer on `[hidden; extra]` with the mask extended over `extra`; returns all positions."""
        seq_len, num_prompts = hidden.shape[1], extra.shape[1]
        args = list(args)
        mask = args[0] if args else kwargs.get("attention_mask")
        mask = extend_attention_mask(
            mask,
            seq_len=seq_len,
            num_prompts=num_prompts,
            is_causal=bool(kwargs.get("is_causal", False)),
            attn_implementation=tower.attn_implementation,
            dtype=hidden.dtype,
            device=hidden.device,
        )
        if args:
            args[0] = mask
        else:
            kwargs = {**kwargs, "attention_mask": mask}
        output = self.base_layer(torch.cat([hidden, extra.to(hidden.dtype)], dim=1), *args, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tower = current_tower()
        if tower is None:
            raise RuntimeError("A PMF fusion layer ran outside `PMFForImageTextClassification.forward`.")
        batch, seq_len = hidden_states.shape[:2]
        if self.index == 0:
            tower.request_prompts(0)  # turns autograd on from here up (the scheduler runs the layers below without)
        expand = (batch, -1, -1)
        prompts = torch.cat([self.query, self.query_context]).expand(*expand)
        queries = self._run(hidden_states, prompts, tower, args, kwargs)[:, seq_len : seq_len + self.query.shape[0]]
        tower.send_readout(self.index, queries, self._exchange)
        translated = tower.request_prompts(self.index + 1)
        fused = torch.cat([translated.to(self.fusion_context.dtype), self.fusion_context.expand(*expand)], dim=1)
        return self._run(hidden_states, fused, tower, args, kwargs)[:, :seq_len]


class PMFForImageTextClassification(nn.Module):
    """PMF prompt fusion on a frozen dual encoder, with PMF's two averaged heads.

    Wraps the top `fusion_layers` encoder layers of each tower of `backbone` in place (give it a backbone of its own).

    Args:
        backbone: a dual encoder of a family in `peft_mitp.families`; frozen here.
        num_labels: number of classes.
        fusion_layers: number of fusion layers at the top of each tower (PMF: 2).
        prompt_length: length of each of the query, query-context and fusion-context prompt sets (PMF: 4).
        translator_hidden: hidden width of the translators. None: half the narrower tower's width (PMF's 384 for
            width-768 towers).
        init_std: standard deviation of the prompts' initialisation (PMF: 0.02).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: int,
        *,
        fusion_layers: int = 2,
        prompt_length: int = 4,
        translator_hidden: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.family = family_for(backbone.config.model_type)
        towers = {kind: resolve_tower(backbone, getattr(self.family, kind), kind) for kind in ("text", "vision")}
        self.attn_implementations = {kind: tower.attn_implementation for kind, tower in towers.items()}
        depth = min(len(tower.layers) for tower in towers.values())
        if not 1 <= fusion_layers <= depth:
            raise ValueError(f"`fusion_layers` must lie in 1..{depth} (the shallower tower's depth), got {fusion_layers}.")
        widths = {kind: tower.width for kind, tower in towers.items()}
        hidden = translator_hidden or min(widths.values()) // 2
        self.exchanges = nn.ModuleList(
            PMFExchange(widths["text"], widths["vision"], hidden) for _ in range(fusion_layers)
        )
        for kind, tower in towers.items():
            first = len(tower.layers) - fusion_layers
            for k in range(fusion_layers):
                tower.layers[first + k] = PMFLayer(
                    tower.layers[first + k], k, widths[kind], prompt_length, self.exchanges[k], init_std
                )
        text_dim, image_dim = self.family.feature_dims(backbone.config)
        self.text_head = init_linear(nn.Linear(text_dim, num_labels))
        self.vision_norm = nn.LayerNorm(image_dim)
        self.vision_head = init_linear(nn.Linear(image_dim, num_labels))

    def forward(self, labels: torch.Tensor | None = None, **inputs: Any) -> Any:
        """Classify image-text pairs (inputs as for `DualEncoderClassifier`); returns loss and averaged logits."""
        text, vision = split_inputs(self.family, inputs)
        backbone, token = self.backbone, self.family.features_token
        result = run_lockstep(
            lambda: pooled(getattr(backbone, self.family.text_features)(**text), token),
            lambda: pooled(getattr(backbone, self.family.image_features)(**vision), token),
            attn_implementations=self.attn_implementations,
        )
        dtype = self.text_head.weight.dtype
        logits = (
            self.text_head(result.text.to(dtype)) + self.vision_head(self.vision_norm(result.vision.to(dtype)))
        ) / 2
        return classification_output(logits, labels)
