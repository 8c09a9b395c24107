"""Run by tests/test_losses.py under torchrun (or alone): one contrastive step, results to a folder.

Writes, from the main process, `result.json` (world size, ranks that ran, loss, first
training-loop loss) and `grads.safetensors` (data-parallel-averaged LoRA gradients).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.losses import ContrastiveLoss
from peftclip.models import load_base
from peftclip.train import TrainConfig, create_accelerator, train

GLOBAL_BATCH = 8


def make_model_and_batch():
    base = load_base()
    model = apply_lora(base.model, LoraConfig(r=2), init_lora_weights=False)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    texts = base.tokenizer([f"caption number {i} of a test batch" for i in range(GLOBAL_BATCH)])
    return model, images, texts


def main(out_dir: str) -> None:
    config = TrainConfig(batch_size=GLOBAL_BATCH, max_steps=1, epochs=1, num_workers=0, cpu=True,
                         warmup_steps=0, output_dir=out_dir)
    accelerator = create_accelerator(config)
    model, images, texts = make_model_and_batch()
    ddp_model = accelerator.prepare(model)
    local = GLOBAL_BATCH // accelerator.num_processes
    rows = slice(accelerator.process_index * local, (accelerator.process_index + 1) * local)
    image_features, text_features, logit_scale = ddp_model(images[rows], texts[rows])
    loss = ContrastiveLoss()(image_features, text_features, logit_scale)
    accelerator.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
    ranks = accelerator.gather(torch.tensor([accelerator.process_index])).tolist()
    pids = accelerator.gather(torch.tensor([__import__("os").getpid()])).tolist()

    fresh, images, texts = make_model_and_batch()
    loop_losses = train(fresh, TensorDataset(images, texts), config, accelerator).losses
    if accelerator.is_main_process:
        out = Path(out_dir)
        save_file(grads, out / "grads.safetensors")
        result = {"world_size": accelerator.num_processes, "ranks": ranks, "pids": pids, "loss": mean_loss,
                  "loop_loss": loop_losses[0], "distributed": dist.is_initialized()}
        (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
