"""One frozen base, many adapters of any strategy: switch per call, disable, merge, interpolate, export.

`AdaptedCLIP` loads a base once and attaches adapters by name. LoRA weights live side by
side in PEFT's multi-adapter layers; unfrozen base parameters (projections, last blocks,
logit scale, a full fine-tune) are separate tensors put in place of the base's when their
adapter is active; prompts and heads are modules the model holds only while active.
Switching therefore moves references, never weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import peft
import torch
import torch.nn.functional as F
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .adapters.attention import SPLIT_MODULES, convert_attention
from .adapters.clip_adapter import CLIP_ADAPTER_NAME, create_clip_adapter, set_clip_adapter
from .adapters.cocoop import CoCoOpPrompt, cocoop_logits, create_cocoop_prompt
from .adapters.heads import CLASSIFIER_NAME, DEFAULT_TEMPLATES, classifier, create_head, image_embed_dim
from .adapters.ia3 import to_peft_config as ia3_peft_config
from .adapters.lora import to_peft_config as lora_peft_config
from .adapters.maple import add_maple_text_hooks, create_maple_prompt
from .adapters.partial import select_parameters
from .adapters.prompts import (
    TEXT_PROMPT_NAME,
    VISUAL_PROMPT_NAME,
    create_text_prompt,
    create_visual_prompt,
    set_text_prompt,
    set_visual_prompt,
)
from .adapters.tip_adapter import TIP_ADAPTER_NAME, TipAdapterClassifier, attach_tip_adapter, set_tip_adapter
from .data import decode_image
from .hub import resolve_adapter
from .index import default_index_path, image_index
from .io import PEFT_METHODS, AdapterError, SavedAdapter, check_peft_keys, is_peft_tensor, read_adapter
from .models import BaseModel
from .utils import canonical_name, write_safetensors_atomic

__all__ = ["ACTIVE", "AdaptedCLIP", "export_open_clip_state_dict"]

ACTIVE = "<active>"  # `adapter=` default of the encode/classify/search calls: whichever adapter is active
ImageInput = torch.Tensor | Sequence[torch.Tensor | Image.Image | str | os.PathLike]
# Each PEFT-applied method: its config builder and PEFT's layer class for it.
_TUNERS: dict[str, tuple[Callable[..., peft.PeftConfig], type[BaseTunerLayer]]] = {
    "lora": (lora_peft_config, LoraLayer),
    "ia3": (ia3_peft_config, IA3Layer),
}

_PEFT_PREFIX = "base_model.model."  # PeftModel's prefix on the names of its tensors
_MODULE_SETTERS: dict[str, Callable[[nn.Module, nn.Module | None], None]] = {
    TEXT_PROMPT_NAME: set_text_prompt,
    VISUAL_PROMPT_NAME: set_visual_prompt,
    CLASSIFIER_NAME: lambda model, head: model.register_module(CLASSIFIER_NAME, head),
    CLIP_ADAPTER_NAME: set_clip_adapter,
    TIP_ADAPTER_NAME: set_tip_adapter,
}


def _locked(method: Callable) -> Callable:
    """Run `method` holding the instance's lock, so switching, running and restoring never interleave."""
    @functools.wraps(method)
    def locked(self: "AdaptedCLIP", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


@dataclass
class _Attached:
    """One attached adapter: what it puts in place of the base while it is active."""

    saved: SavedAdapter
    tokenize: Callable[[list[str]], torch.Tensor]
    peft_name: str | None = None  # its name inside PEFT, which limits names (no dots, no 'lora')
    trained: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical name -> trained value
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # installed while active (scaled)
    modules: dict[str, nn.Module] = field(default_factory=dict)  # prompt / head attribute -> module
    scale: float = 1.0

    def without_base_counterpart(self) -> list[str]:
        """Its methods that have no counterpart in the base's weights (so no interpolation or export)."""
        methods = [m for m, attr in (("text_prompt", TEXT_PROMPT_NAME), ("visual_prompt", VISUAL_PROMPT_NAME),
                                     ("head", CLASSIFIER_NAME), ("tip_adapter", TIP_ADAPTER_NAME))
                   if attr in self.modules]
        partial = self.saved.spec.partial
        return methods + (["new_proj_dim"] if partial is not None and partial.new_proj_dim else [])


class AdaptedCLIP:
    """A base loaded once with any number of named adapters of any strategy.

    The base model is modified in place (its attention is split into q/k/v/out layers,
    which computes the same function). Adapters load from folders or Hub repo ids.

    Args:
        base: the frozen base every adapter was trained on.

    >>> clip = AdaptedCLIP(load_base())  # doctest: +SKIP
    >>> clip.load_adapter("outputs/lora_retrieval", adapter_name="shapes")  # doctest: +SKIP
    >>> features = clip.encode_images(images, adapter="shapes")  # doctest: +SKIP
    >>> base_features = clip.encode_images(images, adapter=None)  # doctest: +SKIP
    """

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model: nn.Module = base.model  # becomes a peft.PeftModel once a LoRA or IA³ adapter is attached
        self.active_adapter: str | None = None
        self.merged: str | None = None
        self._inner = base.model
        self._attached: dict[str, _Attached] = {}
        self._slots: dict[str, tuple[nn.Module, str, nn.Parameter]] = {}  # name -> (owner, attr, base value)
        # One PeftModel per tuner type over the same inner model (PEFT holds one type per PeftModel, and its
        # PeftMixedModel has no IA³ in 0.21): a layer adapted by both is wrapped twice, e.g. IA³(LoRA(Linear)).
        self._peft: dict[str, peft.PeftModel] = {}
        self._peft_on: dict[str, bool] = {}  # whether each type's layers are enabled
        self._peft_count = 0
        # Held while an adapter is switched in, used and switched back: calls from several threads
        # run one after another instead of seeing each other's adapter.
        self._lock = threading.RLock()
        convert_attention(self._inner)
        self._inner.requires_grad_(False).eval()

    @property
    def adapters(self) -> list[str]:
        """Names of the attached adapters, in the order they were added."""
        return list(self._attached)

    @property
    def device(self) -> torch.device:
        return next(self._inner.parameters()).device

    # -- attaching ---------------------------------------------------------------------------

    @_locked
    def load_adapter(self, source: str | os.PathLike, adapter_name: str, revision: str | None = None) -> None:
        """Attach the adapter in folder or Hub repo `source` under `adapter_name`, and make it active.

        Raises `AdapterError` when it is unreadable, altered, or for another base; nothing
        stays attached then.
        """
        name = adapter_name
        if not name or name == ACTIVE or name in self._attached:
            raise ValueError(f"adapter name {name!r} is empty, reserved or attached already")
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged; unmerge() before attaching another")
        saved = read_adapter(resolve_adapter(str(source), revision), self.base.info)
        previous = self.active_adapter
        self._activate(None)  # new slots must see the base's own values
        try:
            record = self._build(saved)
        except (RuntimeError, ValueError, KeyError) as e:
            self._activate(previous, force=True)
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"{saved.folder}: cannot attach to {self.base.info.get('model_name')}: {e}") from e
        self._attached[name] = record
        self._activate(name, force=True)

    def _build(self, saved: SavedAdapter) -> _Attached:
        """Everything the adapter puts in place of the base, loaded from its tensors and checked."""
        record = _Attached(saved, self.base.tokenizer)
        had = set(self._peft)
        try:
            if saved.peft_method is not None:
                record.peft_name = self._add_peft(saved)
            self._build_other(record)
        except BaseException:
            self._remove_peft(saved.peft_method, record.peft_name, had)
            raise
        return record

    def _remove_peft(self, method: str | None, peft_name: str | None, had: set[str]) -> None:
        """Undo a LoRA / IA³ adapter added by a failed attach: remove PEFT's wrapping too if it came with it."""
        if method not in self._peft:
            return
        if not had:  # the first tuner of any type: unwrap (unload strips every tuner's wrappers, so only then)
            self.model = self._peft.pop(method).unload()  # `_inner` is the plain model again
            self._peft_on.clear()
        elif peft_name in self._peft[method].peft_config:
            self._peft[method].delete_adapter(peft_name)

    def _build_other(self, record: _Attached) -> None:
        spec, inner = record.saved.spec, self._inner
        if spec.text_prompt is not None:
            prompt = create_text_prompt(inner, spec.text_prompt, self.base.tokenizer)
            record.modules[TEXT_PROMPT_NAME], record.tokenize = prompt, prompt.tokenize
        if spec.visual_prompt is not None:
            record.modules[VISUAL_PROMPT_NAME] = create_visual_prompt(inner, spec.visual_prompt)
        if spec.head is not None:
            zeros = torch.zeros(spec.head.n_classes, image_embed_dim(inner))
            record.modules[CLASSIFIER_NAME] = create_head(inner, spec.head, zeros)
        if spec.clip_adapter is not None:
            record.modules[CLIP_ADAPTER_NAME] = create_clip_adapter(inner, spec.clip_adapter)
        if spec.cocoop is not None:  # encode uses its context without an image offset; classify conditions it
            prompt = create_cocoop_prompt(inner, spec.cocoop, self.base.tokenizer)
            record.modules[TEXT_PROMPT_NAME], record.tokenize = prompt, prompt.tokenize
        if spec.tip_adapter is not None:  # attached empty (and detached again below), filled from the file
            record.modules[TIP_ADAPTER_NAME] = attach_tip_adapter(inner, spec.tip_adapter)
            set_tip_adapter(inner, None)
        if spec.maple is not None:
            add_maple_text_hooks(inner)
            prompt = create_maple_prompt(inner, spec.maple, self.base.tokenizer)
            record.modules[VISUAL_PROMPT_NAME], record.tokenize = prompt, prompt.tokenize
        tensors = record.saved.other_tensors
        for attr, module in record.modules.items():
            own = {k.removeprefix(f"{attr}."): tensors.pop(k) for k in list(tensors) if k.startswith(f"{attr}.")}
            module.load_state_dict(own)  # strict: names and shapes must match
            module.requires_grad_(False).eval()
        record.trained = self._base_overrides(record.saved, tensors)
        record.params = {n: nn.Parameter(t, requires_grad=False) for n, t in record.trained.items()}

    def _add_peft(self, saved: SavedAdapter) -> str:
        """Add the adapter's LoRA or IA³ weights to PEFT's layers; returns the name PEFT knows them by."""
        method = saved.peft_method
        to_peft_config = _TUNERS[method][0]
        config = to_peft_config(self._inner, getattr(saved.spec, method), inference_mode=True)
        self._peft_count += 1
        name = f"adapter{self._peft_count}"
        if method in self._peft:
            self._peft[method].add_adapter(name, config)
        else:
            with warnings.catch_warnings():
                if self._peft:  # each PeftModel keeps its own configs: PEFT would share the first one's dict
                    del self._inner.peft_config
                    warnings.filterwarnings("ignore", "You are trying to modify a model with PEFT for a second time")
                self._peft[method] = peft.get_peft_model(self._inner, config, adapter_name=name)
            self.model = self.model if isinstance(self.model, peft.PeftModel) else self._peft[method]
        tuned = self._peft[method]
        # PEFT filters out only this PeftModel's other adapters: keep this tuner's tensors. Saved names are those
        # of the adapter alone; under another tuner's wrapper PEFT's own names carry `.base_layer`.
        actual = {canonical_name(k): k for k in peft.get_peft_model_state_dict(tuned, adapter_name=name)
                  if PEFT_METHODS[method][1] in k}
        try:
            check_peft_keys(saved, {_PEFT_PREFIX + k for k in actual})
        except AdapterError:
            tuned.delete_adapter(name)
            raise
        tensors = {actual[canonical_name(k)]: v for k, v in saved.peft_tensors.items()}
        peft.set_peft_model_state_dict(tuned, tensors, adapter_name=name)
        self._inner.requires_grad_(False)
        return name

    def _base_overrides(self, saved: SavedAdapter, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's values for base parameters, checked against what its strategy unfreezes."""
        partial = saved.spec.partial
        names = {canonical_name(n) for n in select_parameters(self._inner, partial)} if partial else set()
        given = {canonical_name(n): t for n, t in tensors.items()}
        if set(given) != names:
            raise AdapterError(f"{saved.folder}: tensors do not match the strategy (missing "
                               f"{sorted(names - set(given))[:3]}, unexpected {sorted(set(given) - names)[:3]})")
        overrides = {}
        for canon, tensor in given.items():
            _, _, base_value = self._slot(canon)
            resized = partial.new_proj_dim is not None and tensor.shape[:1] == base_value.shape[:1]
            if tensor.shape != base_value.shape and not resized:
                raise AdapterError(f"{saved.folder}: {canon} has shape {tuple(tensor.shape)}, "
                                   f"the base expects {tuple(base_value.shape)}")
            overrides[canon] = tensor.to(device=base_value.device, dtype=base_value.dtype)
        return overrides

    def _slot(self, canon: str) -> tuple[nn.Module, str, nn.Parameter]:
        """(owning module, attribute, base value) of a base parameter, looking through PEFT's wrappers."""
        if canon not in self._slots:
            owner_path, _, attr = canon.rpartition(".")
            owner = self._inner
            for part in owner_path.split(".") if owner_path else []:
                owner = getattr(owner, part)
                owner = owner.get_base_layer() if isinstance(owner, BaseTunerLayer) else owner
            self._slots[canon] = (owner, attr, owner._parameters[attr])
        return self._slots[canon]

    @_locked
    def delete_adapter(self, name: str) -> None:
        """Detach adapter `name` and free its tensors."""
        record = self._require(name)
        if self.merged == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge() first")
        if self.active_adapter == name:
            self._activate(None)
        if record.peft_name:
            self._peft[record.saved.peft_method].delete_adapter(record.peft_name)
        del self._attached[name]

    # -- choosing ----------------------------------------------------------------------------

    def _require(self, name: str) -> _Attached:
        if name not in self._attached:
            raise ValueError(f"no adapter named {name!r}; attached: {self.adapters or 'none'}")
        return self._attached[name]

    @_locked
    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` active, or none of them (the bare base) with None."""
        if name is not None:
            self._require(name)
        self._activate(name)

    def _activate(self, name: str | None, force: bool = False) -> None:
        if name == self.active_adapter and not force:
            return
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged; unmerge() before switching")
        record = self._attached.get(name) if name is not None else None
        for canon, (owner, attr, base_value) in self._slots.items():
            setattr(owner, attr, record.params.get(canon, base_value) if record else base_value)
        used = {attr for other in self._attached.values() for attr in other.modules}
        for attr in used:
            _MODULE_SETTERS[attr](self._inner, record.modules.get(attr) if record else None)
        for method in self._peft:
            self._enable_tuner(method, record.peft_name if record and record.saved.peft_method == method else None,
                               force)
        self.active_adapter = name

    def _enable_tuner(self, method: str, peft_name: str | None, force: bool) -> None:
        """Enable `method`'s PEFT layers with adapter `peft_name` active, or disable them all with None.

        Per layer type: PeftModel's enable/disable and set_adapter walk every tuner's layers, of any type.
        """
        on = peft_name is not None
        if on == self._peft_on.get(method) and not force and not on:
            return  # disabling walks every module: skip when nothing changes
        for module in self._tuner_layers(method):
            module.enable_adapters(on)
            if on:
                module.set_adapter(peft_name, inference_mode=True)
        self._peft_on[method] = on

    def _tuner_layers(self, method: str) -> Iterator[BaseTunerLayer]:
        """PEFT's layers of `method` (LoRA or IA³) in the model."""
        layer_type = _TUNERS[method][1]
        return (m for m in self._inner.modules() if isinstance(m, layer_type))

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[nn.Module]:
        """Run a block with adapter `name` active (None: the bare base), then restore the previous one."""
        with self._lock:
            previous = self.active_adapter
            self.set_adapter(name)
            try:
                yield self.model
            finally:
                self._activate(previous)

    def tokenizer(self, name: str | None = ACTIVE) -> Callable[[list[str]], torch.Tensor]:
        """The tokenizer texts need under adapter `name` (text prompts add their placeholders)."""
        name = self.active_adapter if name == ACTIVE else name
        return self._require(name).tokenize if name is not None else self.base.tokenizer

    # -- merging and interpolating -------------------------------------------------------------

    @_locked
    def set_scale(self, name: str, alpha: float) -> None:
        """Interpolate adapter `name` between the base (alpha=0) and itself (alpha=1), WiSE-FT style.

        LoRA updates are scaled by `alpha`; unfrozen parameters become base + alpha·(trained − base).
        """
        record = self._require(name)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha}: must be in [0, 1]")
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged; unmerge() before changing a scale")
        if methods := record.without_base_counterpart():
            raise ValueError(f"adapter {name!r} cannot be interpolated: its {', '.join(methods)} have no "
                             f"counterpart in the base")
        if record.saved.peft_method == "ia3" and alpha != 1.0:
            raise ValueError(f"adapter {name!r} is IA³, which PEFT cannot scale (only LoRA has a scale); "
                             f"alpha={alpha} is refused")
        for module in self._tuner_layers("lora"):
            module.set_scale(record.peft_name, alpha)
        for canon, trained in record.trained.items():
            base_value = self._slots[canon][2].detach()
            record.params[canon] = nn.Parameter(torch.lerp(base_value, trained, alpha), requires_grad=False)
        record.scale = alpha
        if self.active_adapter == name:
            self._activate(name, force=True)

    @_locked
    def merge(self, name: str | None = None) -> None:
        """Activate adapter `name` (default: the active one) and fold its LoRA weights into the base's.

        Other strategies' tensors are in place whenever their adapter is active, so merging
        them costs nothing.
        """
        name = name or self.active_adapter
        record = self._require(name) if name else None
        if record is None:
            raise ValueError("no adapter is active; name the one to merge")
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged already; unmerge() it first")
        self._activate(name)
        if record.peft_name:
            for module in self._tuner_layers(record.saved.peft_method):
                module.merge(adapter_names=[record.peft_name])
        self.merged = name

    @_locked
    def unmerge(self) -> None:
        """Take the merged adapter's LoRA weights back out of the base's; it stays active."""
        if self.merged is None:
            raise ValueError("no adapter is merged")
        record = self._attached[self.merged]
        if record.peft_name:
            for module in self._tuner_layers(record.saved.peft_method):
                module.unmerge()
        self.merged = None

    @_locked
    def export_merged(self, name: str, path: str | os.PathLike) -> Path:
        """Write base + adapter `name` (at its current scale) as a plain open_clip `.safetensors` checkpoint.

        It loads with `open_clip.create_model_and_transforms(model_name, pretrained=path)` and
        needs nothing from peftclip. Prompts, heads and resized projections have no place in
        such a checkpoint and are refused.
        """
        record = self._require(name)
        if methods := record.without_base_counterpart():
            raise ValueError(f"adapter {name!r} cannot be exported as a plain open_clip checkpoint: its "
                             f"{', '.join(methods)} have no place in one")
        previous, was_merged = self.active_adapter, self.merged == name
        if not was_merged:
            self.merge(name)
        try:
            state = export_open_clip_state_dict(self._inner)
        finally:
            if not was_merged:
                self.unmerge()
                self._activate(previous)
        return write_safetensors_atomic(state, path)

    # -- using ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: ImageInput, adapter: str | None = ACTIVE, batch_size: int = 64,
                      normalize: bool = True) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of images: a preprocessed (N, 3, H, W) tensor, or a sequence of
        PIL images, image paths or preprocessed (3, H, W) tensors, in batches."""
        with self._using(adapter):
            return _batched(images, batch_size, "images",
                            lambda chunk: self.model.encode_image(self._image_batch(chunk), normalize=normalize))

    def _image_batch(self, chunk: ImageInput) -> torch.Tensor:
        if isinstance(chunk, torch.Tensor):
            return chunk.to(self.device)
        tensors = [item if isinstance(item, torch.Tensor) else
                   self.base.preprocess_val(item if isinstance(item, Image.Image) else decode_image(str(item)))
                   for item in chunk]
        return torch.stack(tensors).to(self.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], adapter: str | None = ACTIVE, batch_size: int = 256,
                     normalize: bool = True) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of `texts`, tokenized as the adapter needs, in batches."""
        with self._using(adapter):
            tokenize = self.tokenizer(self.active_adapter)
            return _batched(list(texts), batch_size, "texts",
                            lambda chunk: self.model.encode_text(tokenize(chunk).to(self.device),
                                                                 normalize=normalize))

    @torch.no_grad()
    def classify(self, images: ImageInput, class_names: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, adapter: str | None = ACTIVE,
                 batch_size: int = 64) -> torch.Tensor:
        """(N, n_classes) class probabilities of images.

        Zero-shot against `class_names` filled into `templates`, through the adapter's text
        tower; an adapter with a classification head uses its head for the classes it was
        trained on. Class names and templates default to those the adapter was trained with
        (the classify recipe records them), else templates to DEFAULT_TEMPLATES.
        """
        with self._using(adapter):
            record = self._attached.get(self.active_adapter) if self.active_adapter is not None else None
            training = record.saved.metadata.get("training", {}) if record else {}
            trained_names = training.get("class_names")
            class_names = list(class_names) if class_names is not None else trained_names
            if not class_names:
                raise ValueError("give class_names (this adapter records none it was trained on)")
            if record is not None and CLASSIFIER_NAME in record.modules and class_names == trained_names:
                head = classifier(self.model)
                logits = _batched(images, batch_size, "images", lambda chunk: head(self._image_batch(chunk)))
                return logits.softmax(dim=-1)
            templates = list(templates or training.get("classify", {}).get("templates") or DEFAULT_TEMPLATES)
            if record is not None and TIP_ADAPTER_NAME in record.modules and class_names == trained_names:
                tip = TipAdapterClassifier(self.model, self._class_weights(class_names, templates).to(self.device))
                return _batched(images, batch_size, "images", lambda chunk: tip(self._image_batch(chunk))).softmax(-1)
            prompt = record.modules.get(TEXT_PROMPT_NAME) if record is not None else None
            if isinstance(prompt, CoCoOpPrompt):  # each image's own class prompts
                tokens = record.tokenize([t.format(c) for c in class_names for t in templates]).to(self.device)
                return _batched(images, batch_size, "images", lambda chunk: cocoop_logits(
                    self.model, prompt, self._image_batch(chunk), tokens, len(templates))).softmax(dim=-1)
            return self._zero_shot(images, class_names, templates, batch_size).softmax(dim=-1)

    def _class_weights(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        """(C, D) normalised text embeddings of each class, averaged over its templates, active adapter's."""
        texts = [template.format(c) for c in class_names for template in templates]  # class-major
        prompt = getattr(self._inner, TEXT_PROMPT_NAME, None)
        # Class-specific context vectors need every class's texts in one batch, in class order.
        text_batch = len(texts) if prompt is not None and prompt.config.class_specific else 256
        weights = self.encode_texts(texts, batch_size=text_batch)
        return F.normalize(weights.view(len(class_names), len(templates), -1).mean(1), dim=-1)

    def _zero_shot(self, images: ImageInput, class_names: list[str], templates: list[str],
                   batch_size: int) -> torch.Tensor:
        weights = self._class_weights(class_names, templates)
        features = self.encode_images(images, batch_size=batch_size)
        return self._inner.logit_scale.exp().float().cpu() * features @ weights.T

    def search(self, query: str, folder: str | os.PathLike, top_k: int = 5,
               index_path: str | os.PathLike | None = None, adapter: str | None = ACTIVE) -> list[tuple[Path, float]]:
        """The `top_k` images of `folder` closest to `query`, best first, with cosine similarities.

        Image embeddings are kept in a safetensors index (default: under `cache_root()/search`)
        and reused while the folder's files and the model are unchanged.
        """
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: must be at least 1")
        with self._using(adapter):
            folder = Path(folder)
            owned = index_path is None
            index_path = Path(index_path) if index_path else default_index_path(folder)
            files, embeddings = image_index(folder, index_path, self._identity(), self.encode_images, owned)
            query_embedding = self.encode_texts([query])
        scores = (query_embedding @ embeddings.T)[0]
        top = scores.topk(min(top_k, len(files)))
        return [(files[i], float(scores[i])) for i in top.indices.tolist()]

    def _identity(self) -> str:
        """Names the active model: the base, and the adapter's weights checksum and scale."""
        record = self._attached.get(self.active_adapter) if self.active_adapter else None
        adapter = [record.saved.metadata["weights_sha256"], record.scale] if record else None
        return json.dumps({"base": self.base.info, "adapter": adapter}, sort_keys=True)

    @contextlib.contextmanager
    def _using(self, adapter: str | None) -> Iterator[None]:
        with self._lock:
            if adapter == ACTIVE:
                yield
            else:
                with self.using(adapter):
                    yield


def _batched(items: ImageInput | list[str], batch_size: int, what: str,
             encode: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """`encode` over `items` in chunks of `batch_size`, concatenated as float32 on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    n = len(items)
    sliceable = isinstance(items, (torch.Tensor, list, tuple))
    chunks = []
    for start in tqdm(range(0, n, batch_size), desc=f"embedding {what}", disable=n <= batch_size, leave=False):
        stop = min(start + batch_size, n)
        chunk = items[start:stop] if sliceable else [items[i] for i in range(start, stop)]  # e.g. a Dataset
        chunks.append(encode(chunk).float().cpu())
    if not chunks:
        raise ValueError(f"no {what} to embed")
    return torch.cat(chunks)


def export_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's own state dict layout for a converted (and maybe LoRA-wrapped, merged) model.

    Each split module (`SplitMultiheadAttention`, `SplitQKV`, `SplitAttentionPool2d`) writes its
    original layout (`open_clip_state`); PEFT wrappers are looked through to their (merged) base
    layers; LoRA and peftclip-only tensors are dropped.
    """
    state: dict[str, torch.Tensor] = {}
    split = [(n, m) for n, m in model.named_modules() if isinstance(m, SPLIT_MODULES)]
    for name, module in split:
        state.update(module.open_clip_state(name))
    inside = tuple(f"{n}." for n, _ in split)
    for key, tensor in model.state_dict().items():
        if key.startswith(inside) or is_peft_tensor(key) or key.startswith("peftclip_"):
            continue
        state[canonical_name(key)] = tensor
    # Copies, not views: the caller may unmerge the live weights before writing these out.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
