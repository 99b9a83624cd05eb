"""`MITPModel`: the peft tuner that decides which layers get temporal prompts and owns the memory hubs."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .adapter_files import check_adapter_weights, check_hub_weights  # noqa: F401  (re-exported: public API)
from .config import DEFAULT_FUSION_HIDDEN_SIZE, MITPConfig
from .hub import MemoryHub, ModalityStandIns
from .layer import MITPLayer
from .mixed import BASE, mixed_batch
from .sharing import install_hooks, sync_adapter_head

_UPCAST = (torch.float16, torch.bfloat16)


def default_pairing(
    config: MITPConfig, text_depth: int, vision_depth: int
) -> tuple[list[int], list[int]]:
    """Resolve the interaction layers of both towers from `config` and the towers' depths.

    The shallower tower takes its last `num_interaction_layers` layers; each is paired with the layer of the deeper
    tower at the same relative depth, `floor(i * deep / shallow)` (CLIP ViT-L/14: text 8..11 with vision 16, 18, 20,
    22). A list given for one tower only is mapped to the other tower the same way.

    Raises:
        ValueError: an index is out of range, or the derived pairing would repeat a layer.
    """
    text, vision = config.text_layers, config.vision_layers
    for name, layers, depth in (("text_layers", text, text_depth), ("vision_layers", vision, vision_depth)):
        if layers is not None and layers[-1] >= depth:
            raise ValueError(
                f"`{name}`={layers} is out of range: this backbone's {name.split('_')[0]} tower has {depth} layers "
                f"(valid indices 0..{depth - 1})."
            )

    def mapped(layers: list[int], src_depth: int, dst_depth: int, dst_name: str) -> list[int]:
        out = [i * dst_depth // src_depth for i in layers]
        if len(set(out)) != len(out):
            raise ValueError(
                f"Mapping {layers} onto a {dst_depth}-layer tower repeats layers ({out}); set `{dst_name}` "
                "explicitly."
            )
        return out

    if text is None and vision is None:
        count = config.num_interaction_layers
        shallow = min(text_depth, vision_depth)
        if count > shallow:
            raise ValueError(
                f"`num_interaction_layers`={count} exceeds the shallower tower's depth ({shallow} layers); "
                f"use at most {shallow}."
            )
        if text_depth <= vision_depth:
            text = list(range(text_depth - count, text_depth))
        else:
            vision = list(range(vision_depth - count, vision_depth))
    if vision is None:
        vision = mapped(text, text_depth, vision_depth, "vision_layers")
    if text is None:
        text = mapped(vision, vision_depth, text_depth, "text_layers")
    return text, vision


def decoder_pairing(config: MITPConfig, language_depth: int, vision_depth: int) -> tuple[list[int], list[int]]:
    """The interaction layers of a decoder VLM: (language model layers, vision tower layers).

    `vision_depth` counts only the vision layers whose output the model uses. By default both parts take their last
    `num_interaction_layers` layers (the vision tower's last used ones): the language model then has no autograd
    below its top layers, and the vision read-outs come from the layers nearest the image tokens it reads. A list
    given for one part only is matched by the other part's last layers.

    Raises:
        ValueError: an index is out of range (for the vision tower: above the last layer the model uses), or the
            count exceeds a part's depth.
    """
    text, vision = config.text_layers, config.vision_layers
    if text is not None and text[-1] >= language_depth:
        raise ValueError(
            f"`text_layers`={text} is out of range: this model's language model has {language_depth} layers (valid "
            f"indices 0..{language_depth - 1})."
        )
    if vision is not None and vision[-1] >= vision_depth:
        raise ValueError(
            f"`vision_layers`={vision} is out of range: this model uses the output of its vision layer "
            f"{vision_depth - 1} (layers above it do not reach the language model), so valid indices are "
            f"0..{vision_depth - 1}."
        )
    count = len(text) if text is not None else len(vision) if vision is not None else config.num_interaction_layers
    for name, depth, given in (("language model", language_depth, text), ("vision tower", vision_depth, vision)):
        if given is None and count > depth:
            raise ValueError(
                f"{count} interaction pairs need {count} layers, but the {name} has {depth} usable layers; set "
                "`num_interaction_layers` lower or give `text_layers` / `vision_layers`."
            )
    if text is None:
        text = list(range(language_depth - count, language_depth))
    if vision is None:
        vision = list(range(vision_depth - count, vision_depth))
    return text, vision


# ---- Loading checks (docs/reliability.md, "Loading checks") --------------------------------------------------------
def backbone_record(model: nn.Module) -> dict[str, Any]:
    """What an adapter records about the backbone it is built for (`MITPConfig.backbone`).

    Args:
        model: the `MITPForImageTextClassification` the adapter goes on.

    Returns:
        {"model_type", "text_model_type", "vision_model_type", "text_width", "vision_width", "text_depth",
        "vision_depth"}: the backbone's `config.model_type`, each tower's `config.model_type`, hidden width and number
        of encoder layers. Prompts and hub maps take their shapes from the widths; the layer indices refer to the
        depths.
    """
    towers = model.mitp_towers()
    record: dict[str, Any] = {"model_type": model.config.backbone_config.model_type}
    for kind in ("text", "vision"):
        record[f"{kind}_model_type"] = towers[kind].module.config.model_type
    for kind in ("text", "vision"):
        record[f"{kind}_width"] = towers[kind].width
    for kind in ("text", "vision"):
        record[f"{kind}_depth"] = len(towers[kind].layers)
    return record


def check_backbone(config: MITPConfig, model: nn.Module, adapter_name: str = "default") -> None:
    """Record the backbone in a new adapter's config, or check a loaded adapter's record against the model.

    Called when an adapter is injected (`get_peft_model`, `PeftModel.from_pretrained`, `load_adapter`), before any
    weight is created or loaded, so an adapter trained on another backbone fails here with both backbones named
    instead of in `load_state_dict` with a list of size mismatches. Keys missing from an older record are not checked.

    Args:
        config: the adapter's config; `config.backbone` is filled in when None.
        model: the `MITPForImageTextClassification` the adapter goes on.
        adapter_name: the adapter's name, for the message.

    Raises:
        ValueError: the recorded backbone differs from the model's.
    """
    actual = backbone_record(model)
    if config.backbone is None:
        config.backbone = actual
        return
    if not isinstance(config.backbone, dict):
        raise ValueError(
            f"`backbone` in the config of MITP adapter {adapter_name!r} must be a dict (it is filled in when the "
            f"adapter is created), got {config.backbone!r}."
        )
    differs = [key for key in actual if key in config.backbone and config.backbone[key] != actual[key]]
    if differs:

        def describe(record: dict[str, Any]) -> str:
            return ", ".join(f"{key}={record.get(key)!r}" for key in actual)

        raise ValueError(
            f"MITP adapter {adapter_name!r} was built for another backbone. It was built for: "
            f"{describe(config.backbone)}; this model's backbone is: {describe(actual)} (they differ in "
            f"{', '.join(differs)}). Its prompts and memory hub have the first backbone's shapes and layer indices: "
            "load it onto the backbone it was trained on (`base_model_name_or_path` in its adapter_config.json names "
            "it, when it was recorded), or train a new adapter for this backbone. (An `MITPConfig` records the "
            "backbone when it is first used: give each backbone its own config object.)"
        )


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


class MITPModel(BaseTuner):
    """The MITP tuner: wraps the interaction layers of both towers and holds one `MemoryHub` per adapter.

    Created by `peft.get_peft_model(task_model, MITPConfig(...))` once `peft_mitp` is imported. The task model must
    be a `MITPForImageTextClassification` (it runs the towers in lock-step). The hubs live here, in
    `self.mitp_hub[adapter_name]`, so peft saves and loads them with the adapter; the classification head lives in
    the task model and is saved through `modules_to_save`.

    Args:
        model: the `MITPForImageTextClassification` to adapt.
        config: the `MITPConfig`.
        adapter_name: name of the adapter, default "default".
        low_cpu_mem_usage: create the adapter weights on the meta device (they are filled in when loading).
    """

    prefix: str = "mitp_"
    tuner_layer_cls = MITPLayer
    target_module_mapping: dict[str, list[str]] = {}
    # The hub is shared by all wrapped layers: `inject_adapter_in_model` cannot carry it, `get_peft_model` can.
    uses_shared_state = True

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: MITPConfig, model_config: dict) -> MITPConfig:
        return peft_config

    def _towers(self, model: nn.Module) -> dict[str, Any]:
        towers = getattr(model, "mitp_towers", None)
        if towers is None:
            raise TypeError(
                f"MITP adapters go on a `MITPForImageTextClassification`, got {type(model).__name__}. Wrap your "
                "dual encoder first: `MITPForImageTextClassification.from_backbone(backbone, num_labels=...)`."
            )
        return towers()

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Resolve the interaction layers, create the adapter's hub, then let peft wrap the layers."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, MITPConfig):
            raise TypeError(f"MITPModel needs an MITPConfig, got {type(config).__name__}.")
        towers = self._towers(model)
        # The MITP card, safetensors-only saving and checked loading in PeftModel's methods: installed by the first
        # MITP adapter, not at import, so importing peft_mitp leaves peft's classes as they are.
        install_hooks()
        # Record the backbone in a new adapter's config, or refuse a loaded one built for another (docs/reliability.md).
        check_backbone(config, model, adapter_name)
        # Record the head in a new adapter's config, or check / size it for a loaded one (docs/sharing.md).
        sync_adapter_head(model, config)
        text, vision = towers["text"], towers["vision"]
        direction = getattr(model, "mitp_direction", "both")
        if direction == "vision_to_text":
            if config.missing_modality:
                raise ValueError(
                    "`missing_modality=True` is not supported on decoder vision-language models (the language model "
                    "reads the image tokens themselves, which no stand-in replaces). Create the adapter without it."
                )
            text_layers, vision_layers = decoder_pairing(config, len(text.layers), vision.usable_depth)
        else:
            text_layers, vision_layers = default_pairing(config, len(text.layers), len(vision.layers))
        config.text_layers, config.vision_layers = text_layers, vision_layers
        targets: dict[str, tuple[str, int, int]] = {}
        for tower, layers, prompts in (
            (text, text_layers, config.text_prompt_length),
            (vision, vision_layers, config.vision_prompts),
        ):
            kind = "text" if tower is text else "vision"
            for pair, index in enumerate(layers):
                targets[f"{tower.layers_path}.{index}"] = (kind, pair, prompts)
        config.target_modules = list(targets)
        if not hasattr(self, "_mitp_targets"):
            self._mitp_targets: dict[str, dict[str, tuple[str, int, int]]] = {}
        self._mitp_targets[adapter_name] = targets
        self._mitp_widths = {"text": text.width, "vision": vision.width}

        if "mitp_hub" not in self._modules:
            self.mitp_hub = nn.ModuleDict()
        param = next(model.parameters())
        ctx = torch.device("meta") if low_cpu_mem_usage else nullcontext()
        # With one pair no read-out feeds a next pair, so the hub's maps and gates would never run (and never get a
        # gradient, which DDP without `find_unused_parameters` refuses): the hub then has none.
        interaction = config.interaction and len(text_layers) > 1
        tokens = config.token_consolidation
        family = getattr(model, "family", None)
        offered = direction == "both" and getattr(family, "output_tokens", False)
        if tokens is None:
            tokens = config.interaction and offered
        elif tokens and not offered:
            reason = (
                "on decoder vision-language models yet (the language model already reads the image tokens)"
                if direction != "both"
                else f"for {getattr(family, 'name', type(model).__name__)}: its feature functions do not return the "
                "towers' last-layer tokens at the layers' width"
            )
            raise ValueError(
                f"`token_consolidation=True` is not available {reason}. Leave it None (on wherever it is available) "
                "or set it to False."
            )
        if tokens and config.hub_dim % config.token_heads:
            raise ValueError(
                f"`hub_dim`={config.hub_dim} must be divisible by `token_heads`={config.token_heads} (each head of the "
                "token consolidation takes an equal slice of the hub's shared space), or set `token_consolidation=False`."
            )
        # Resolved like the layer lists, so that the saved config names what runs.
        config.token_consolidation = bool(tokens)
        if config.fusion_hidden_size is None:
            config.fusion_hidden_size = DEFAULT_FUSION_HIDDEN_SIZE if direction == "both" else 0
        with ctx:
            stand_ins = None
            if config.missing_modality:  # docs/reliability.md, "Missing modalities"
                text_feature_dim, vision_feature_dim = model.mitp_feature_dims()
                stand_ins = ModalityStandIns(
                    text_prompts=config.text_prompt_length,
                    vision_prompts=config.vision_prompts,
                    text_width=text.width,
                    vision_width=vision.width,
                    text_feature_dim=text_feature_dim,
                    vision_feature_dim=vision_feature_dim,
                    # Only read-outs of pairs that feed a next pair reach the hub, and only across an interaction.
                    readout_pairs=len(text_layers) - 1 if interaction else 0,
                )
            hub = MemoryHub(
                text.width,
                vision.width,
                hub_dim=config.hub_dim,
                similarity=config.similarity,
                temperature=config.effective_temperature,
                activation=config.activation,
                interaction=interaction,
                memory=config.memory,
                # One pair carries nothing into a next pair: no memory gates (they would never get a gradient).
                memory_gate_init=config.memory_gate_init if len(text_layers) > 1 else None,
                stand_ins=stand_ins,
                modality_dropout=config.modality_dropout,
                consolidation=config.consolidation,
                gate_init=config.gate_init,
                direction=direction,
                token_heads=config.token_heads if tokens else 0,
                fusion_hidden_size=config.fusion_hidden_size,
                feature_dim=sum(model.mitp_feature_dims()),
            )
        # Under low_cpu_mem_usage (or peft's init_empty_weights) the hub is on the meta device: loading assigns it.
        if param.device.type != "meta" and not any(p.device.type == "meta" for p in hub.parameters()):
            hub.to(param.device)
        self.mitp_hub[adapter_name] = hub
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        self._size_adapter_head(model, adapter_name, config)

    @staticmethod
    def _size_adapter_head(model: nn.Module, adapter_name: str, config: MITPConfig) -> None:
        """Give the adapter's copy of the head its own size when it differs from the task model's head.

        peft copies the task model's head for each adapter (`modules_to_save`); an adapter trained with another
        number of labels needs a copy of its size before its weights load into it.
        """
        wrapper = getattr(model, "classifier", None)
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            return
        copy = wrapper.modules_to_save[adapter_name]
        if config.num_labels is None or copy.out_features == config.num_labels:
            return
        head = nn.Linear(copy.in_features, config.num_labels, device=copy.weight.device, dtype=copy.weight.dtype)
        if head.weight.device.type != "meta":
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        head.requires_grad_(copy.weight.requires_grad)
        wrapper.modules_to_save[adapter_name] = head

    def _check_target_module_exists(self, peft_config: MITPConfig, key: str) -> bool:
        return key in (peft_config.target_modules or [])

    def _create_and_replace(
        self,
        peft_config: MITPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        tower, pair, prompts = self._mitp_targets[adapter_name][current_key]
        if isinstance(target, MITPLayer):
            target.update_layer(adapter_name, pair=pair, prompt_length=prompts, init_std=peft_config.prompt_init_std)
            return
        new_module = MITPLayer(
            target,
            adapter_name,
            tower=tower,
            pair=pair,
            prompt_length=prompts,
            width=self._mitp_widths[tower],
            init_std=peft_config.prompt_init_std,
            hubs=self.mitp_hub,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # peft's version assumes a Linear-like child with `.weight`; encoder layers have none.
        setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------ trainability
    def _sync_hub_requires_grad(self) -> None:
        if "mitp_hub" not in self._modules:
            return
        disabled = any(getattr(m, "disable_adapters", False) for m in self.model.modules() if isinstance(m, MITPLayer))
        for name, hub in self.mitp_hub.items():
            config = self.peft_config.get(name)
            trainable = (
                name in self.active_adapters and config is not None and not config.inference_mode and not disabled
            )
            hub.requires_grad_(trainable)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_hub_requires_grad()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter (its prompts, hub and head); see `peft.PeftModel.set_adapter`."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"MITP does not allow more than one active adapter at a time; got {names}. Pass a single adapter name "
                "(or one name per sample with `model(**batch, adapter_names=[...])`)."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if "mitp_hub" in self._modules:
            for name, hub in self.mitp_hub.items():
                hub.requires_grad_(name in names and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Enable or disable gradients of the given adapters' prompts and hubs."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.mitp_hub.keys()):
            self.mitp_hub[name].requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_hub_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter: its prompts in every layer, its hub and its head copy."""
        super().delete_adapter(adapter_name)
        if adapter_name in self.mitp_hub:
            del self.mitp_hub[adapter_name]
        self._mitp_targets.pop(adapter_name, None)
        # Deleting the active adapter makes peft's layers activate the next one and its prompts trainable: its hub
        # must follow its prompts, or the hub would stay frozen beside trainable prompts.
        for name, hub in self.mitp_hub.items():
            prompts = [
                m.mitp_prompt[name] for m in self.model.modules() if isinstance(m, MITPLayer) and name in m.mitp_prompt
            ]
            hub.requires_grad_(name in self.active_adapters and any(p.requires_grad for p in prompts))

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Give the adapter's tensors their dtype, by one rule on every path (created, loaded, `low_cpu_mem_usage`).

        - prompts and hub: float32 with `autocast_adapter_dtype=True` (peft's default), else the dtype of the layer
          they sit in (prompts) and of the backbone's towers (hub), whatever dtype the adapter file holds;
        - head copy (`modules_to_save`): the dtype of the head it copies.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for module in self.model.modules():
            if isinstance(module, MITPLayer) and adapter_name in module.mitp_prompt:
                dtype = torch.float32 if autocast_adapter_dtype else _float_dtype(module.get_base_layer())
                prompt = module.mitp_prompt[adapter_name]
                if dtype is not None and prompt.dtype != dtype:
                    prompt.data = prompt.data.to(dtype)
            # `low_cpu_mem_usage=True` assigns a half-precision adapter file as is: give the head copy back the dtype
            # of the head it copies, as a normal load does (docs/sharing.md, "Half-precision files").
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                reference = next(module.original_module.parameters(), None)
                copy = module.modules_to_save[adapter_name]
                if reference is not None and any(p.dtype != reference.dtype for p in copy.parameters()):
                    copy.to(reference.dtype)
        if adapter_name in self.mitp_hub:
            hub = self.mitp_hub[adapter_name]
            towers = self._towers(self.model)
            dtype = torch.float32 if autocast_adapter_dtype else _float_dtype(towers["text"].module)
            if dtype is not None and any(p.dtype != dtype for p in hub.parameters()):
                hub.to(dtype)

    # ------------------------------------------------------------------ forward
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Run a forward with one adapter per sample when `adapter_names` is given (`peft_mitp.mixed`).

        Raises:
            ValueError: `adapter_names` in training mode, naming an adapter that does not exist, of the wrong length,
                or naming adapters whose interaction layers or prompt lengths differ; `alora_offsets` (aLoRA only).
        """
        if kwargs.get("alora_offsets") is not None:
            raise ValueError("`alora_offsets` applies to aLoRA adapters only, not to MITP adapters.")
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        with mixed_batch(self._check_adapter_names(names, kwargs)):
            yield

    def _check_adapter_names(self, names: Any, inputs: dict[str, Any]) -> list[str]:
        """`adapter_names` checked against the loaded adapters and the batch, before any compute."""
        if self.training:
            # peft's wording (LoRA): mixed batches are for inference.
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"`adapter_names` must be a list of adapter names, one per sample, got {names!r}.")
        names = list(names)
        unknown = sorted(set(names) - set(self.peft_config) - {BASE})
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Loaded adapters: "
                f"{sorted(self.peft_config)}; use '{BASE}' for samples without an adapter."
            )
        for key, dims in (("input_ids", 2), ("pixel_values", 4)):  # (packed or tiled pixel values have other rows)
            value = inputs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == dims and value.shape[0] != len(names):
                raise ValueError(
                    f"`adapter_names` names {len(names)} samples but `{key}` holds {value.shape[0]}: give one name per "
                    "sample."
                )
        for key in ("image_present", "text_present"):
            if inputs.get(key) is not None:
                raise ValueError(f"Mixed-adapter batches do not support missing modalities (`{key}`).")
        used = [n for n in dict.fromkeys(names) if n != BASE]
        layouts = {}
        for name in used:
            config = self.peft_config[name]
            if config.missing_modality:
                raise ValueError(f"Mixed-adapter batches do not support adapters with missing_modality=True ({name!r}).")
            layouts[name] = (config.text_layers, config.vision_layers, config.text_prompt_length, config.vision_prompts)
        if len(set(map(repr, layouts.values()))) > 1:
            described = "; ".join(f"{n!r}: text layers {v[0]}, vision layers {v[1]}, prompts {v[2]}/{v[3]}"
                                  for n, v in layouts.items())
            raise ValueError(
                "The adapters of a mixed batch must share their interaction layers and prompt lengths, so that the "
                f"backbone runs once for all samples; these differ ({described}). Run them in separate batches "
                "(`model.set_adapter(name)`)."
            )
        return names

    # ------------------------------------------------------------------ merging / unloading
    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "MITP cannot be merged: its temporal prompts are extra tokens and its memory hub runs between the towers, "
            "so no weights can be folded into the backbone. Use `model.unload()` to get the task model back (it "
            "keeps the trained classifier), or keep the adapter loaded."
        )

    # ------------------------------------------------------------------ saving / loading
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # peft strips the adapter name only in the second-to-last segment; the hub nests it deeper.
        hub_key = re.sub(rf"(^|\.)mitp_hub\.{re.escape(adapter_name)}\.", r"\1mitp_hub.", key)
        if hub_key != key:
            return hub_key
        return super()._remove_adapter_name_from_key(key, adapter_name)
