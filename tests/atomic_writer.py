"""Run by tests/test_reliability.py: save the same adapter folder over and over until killed.

Each save holds LoRA weights all equal to one value (the save's number), so a reader can
tell whether a folder is one complete save.
"""

from __future__ import annotations

import itertools
import sys

import torch

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.io import save_adapter, save_metrics
from peftclip.models import load_base


def main(out_dir: str) -> None:
    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2))
    for version in itertools.count(1):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.fill_(float(version))
        save_adapter(model, out_dir, base.info, {"lora": ClipLoraConfig(r=2).to_dict()}, {"version": version})
        save_metrics(out_dir, {"version": version})
        print(version, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
