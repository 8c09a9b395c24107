"""One frozen base, many LoRA adapters: switch per call, disable, merge, interpolate, export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters.attention import SplitMultiheadAttention
from .io import AdapterError, _check_base, load_adapter, read_metadata
from .models import BaseModel

__all__ = ["AdaptedCLIP", "embed_images", "export_open_clip_state_dict", "image_index"]


class AdaptedCLIP:
    """A base loaded once with any number of named LoRA adapters.

    >>> clip = AdaptedCLIP(load_base())  # doctest: +SKIP
    >>> clip.add_adapter("shapes", "outputs/lora_retrieval")  # doctest: +SKIP
    >>> with clip.using("shapes"):  # doctest: +SKIP
    ...     features = clip.model.encode_image(images)
    """

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model: nn.Module = base.model
        self.adapters: list[str] = []
        self.merged: str | None = None

    def add_adapter(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Attach the LoRA adapter in `adapter_dir` under `name` (checked like `load_adapter`)."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already attached")
        metadata = read_metadata(adapter_dir)
        if set(metadata["strategy"]) != {"lora"}:
            raise AdapterError(f"{adapter_dir}: only LoRA adapters can share one base at run time "
                               f"(this one has {sorted(metadata['strategy'])}); load it with load_adapter")
        if not self.adapters:
            self.model = load_adapter(self.base, adapter_dir, adapter_name=name)
        else:
            _check_base(Path(adapter_dir), metadata["base"], self.base.info)
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
        self.adapters.append(name)
        self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter."""
        self._require(name)
        self.model.set_adapter(name)

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; attached: {self.adapters or 'none'}")

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[nn.Module]:
        """Run a block with adapter `name` active, or with every adapter off when `name` is None."""
        if name is None:
            if not self.adapters:
                yield self.model
                return
            with self.model.disable_adapter():
                yield self.model
            return
        previous = self.model.active_adapter
        self.set_adapter(name)
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous)

    def set_scale(self, name: str, alpha: float) -> None:
        """Interpolate adapter `name` between the base (alpha=0) and itself (alpha=1), WiSE-FT style."""
        self._require(name)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha}: must be in [0, 1]")
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(name, alpha)

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weights for zero-overhead inference."""
        self._require(name)
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged already; unmerge it first")
        self.model.base_model.merge_adapter([name])
        self.merged = name

    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weights."""
        if self.merged is None:
            raise ValueError("no adapter is merged")
        self.model.base_model.unmerge_adapter()
        self.merged = None

    def export_merged(self, name: str, path: str | os.PathLike) -> Path:
        """Write base + adapter `name` as a plain open_clip checkpoint (`.safetensors`).

        It loads with `open_clip.create_model_and_transforms(model_name, pretrained=path)` and
        needs nothing from peftclip.
        """
        self._require(name)
        self.merge(name)
        try:
            state = export_open_clip_state_dict(self.model.get_base_model())
        finally:
            self.unmerge()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(state, tmp)
        os.replace(tmp, path)
        return path


def export_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's own state dict layout for a converted (and maybe LoRA-wrapped, merged) model.

    Split attention goes back to fused `in_proj_weight`/`in_proj_bias`; PEFT wrappers are
    looked through to their (merged) base layers; LoRA and peftclip-only tensors are dropped.
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitMultiheadAttention):
            linears = [getattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            layers = [getattr(layer, "base_layer", layer) for layer in linears]
            state[f"{name}.in_proj_weight"] = torch.cat([lin.weight for lin in layers[:3]])
            if layers[0].bias is not None:
                state[f"{name}.in_proj_bias"] = torch.cat([lin.bias for lin in layers[:3]])
                state[f"{name}.out_proj.bias"] = layers[3].bias
            state[f"{name}.out_proj.weight"] = layers[3].weight
    attention = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, SplitMultiheadAttention))
    for key, tensor in model.state_dict().items():
        if key.startswith(attention) or "lora_" in key or key.startswith("peftclip_"):
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    # Copies, not views: the caller may unmerge the live weights before writing these out.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def _folder_signature(files: list[Path]) -> str:
    """Changes when any image is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@torch.no_grad()
def embed_images(model: nn.Module, transform: Callable, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
    """Normalised image embeddings of `paths`, in batches, with a progress bar for long lists."""
    from tqdm.auto import tqdm

    from .data import decode_image
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding", disable=len(paths) <= batch_size,
                      leave=False):
        batch = torch.stack([transform(decode_image(str(p))) for p in paths[start:start + batch_size]])
        chunks.append(model.encode_image(batch.to(device), normalize=True).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def image_index(model: nn.Module, transform: Callable, folder: str | os.PathLike, index_path: str | os.PathLike,
                identity: str) -> tuple[list[Path], torch.Tensor]:
    """Embeddings of every image in `folder`, kept in `index_path` and reused while nothing changed.

    `identity` names the model (base and adapter checksum); a different one rebuilds the index.
    """
    folder, index_path = Path(folder), Path(index_path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    signature = hashlib.sha256(f"{_folder_signature(files)}\0{identity}".encode()).hexdigest()
    if index_path.is_file():
        with safe_open(str(index_path), "pt") as f:
            if f.metadata().get("signature") == signature:
                return files, f.get_tensor("embeddings")
    embeddings = embed_images(model, transform, files)
    tmp = index_path.with_name(f".{index_path.name}.tmp-{os.getpid()}")
    save_file({"embeddings": embeddings.contiguous()}, tmp,
              metadata={"signature": signature, "files": json.dumps([p.name for p in files])})
    os.replace(tmp, index_path)
    return files, embeddings
