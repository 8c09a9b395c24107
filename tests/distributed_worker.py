"""Run by tests/test_losses.py under torchrun (or alone): one contrastive step, results to a folder.

`python distributed_worker.py OUT_DIR [MODEL_NAME [LORA_TOWERS]]` (towers comma-separated) writes,
from the main process, `result.json` (world size, ranks that ran, loss, first training-loop loss, the open_clip
loss class used) and `grads.safetensors` (data-parallel-averaged LoRA gradients).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.losses import contrastive_step, loss_for
from peftclip.models import TINY_MODEL, BaseConfig, load_base
from peftclip.train import TrainConfig, create_accelerator, train

GLOBAL_BATCH = 8


def make_model_and_batch(model_name: str, towers: list[str]):
    base = load_base(BaseConfig(model_name=model_name))
    model = apply_lora(base.model, ClipLoraConfig(r=2, towers=towers), init_lora_weights=False)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    texts = base.tokenizer([f"caption number {i} of a test batch" for i in range(GLOBAL_BATCH)])
    return model, images, texts


def main(out_dir: str, model_name: str = TINY_MODEL, towers: str = "vision,text") -> None:
    config = TrainConfig(batch_size=GLOBAL_BATCH, max_steps=1, epochs=1, num_workers=0, cpu=True,
                         warmup_steps=0, output_dir=out_dir)
    accelerator = create_accelerator(config)
    model, images, texts = make_model_and_batch(model_name, towers.split(","))
    ddp_model = accelerator.prepare(model)
    local = GLOBAL_BATCH // accelerator.num_processes
    rows = slice(accelerator.process_index * local, (accelerator.process_index + 1) * local)
    loss = contrastive_step(ddp_model, (images[rows], texts[rows]))
    accelerator.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
    ranks = accelerator.gather(torch.tensor([accelerator.process_index])).tolist()
    pids = accelerator.gather(torch.tensor([os.getpid()])).tolist()

    fresh, images, texts = make_model_and_batch(model_name, towers.split(","))
    loop_losses = train(fresh, TensorDataset(images, texts), config, accelerator).losses
    if accelerator.is_main_process:
        out = Path(out_dir)
        save_file(grads, out / "grads.safetensors")
        result = {"world_size": accelerator.num_processes, "ranks": ranks, "pids": pids, "loss": mean_loss,
                  "loop_loss": loop_losses[0], "distributed": dist.is_initialized(),
                  "loss_class": type(loss_for(ddp_model)).__name__}
        (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
