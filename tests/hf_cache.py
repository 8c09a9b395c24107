"""A pre-filled Hugging Face hub cache holding a tiny tokenizer and text-model config, for offline tests.

The tiny configs `peftclip-tiny-siglip` and `peftclip-tiny-hftext` take their tokenizer
(and the HF text tower its `config.json`) from the Hub id `TINY_HUB_ID`, through the real
`transformers.AutoTokenizer` / `AutoConfig` code path. `fill_hub_cache` writes that repo in
the hub cache layout (`models--ORG--NAME/snapshots/<commit>/...` and `refs/main`), so
with `HF_HUB_OFFLINE=1` the id resolves from disk exactly as a downloaded one would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

TINY_HUB_ID = "peftclip/tiny-tokenizer"
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3: the text tower masks pad_token_id=1
WORDS = ("a an the of in on at with and to photo picture image caption number test batch red blue green dog dogs "
         "cat two three playing snow sunny day circle square man woman child running street water grass").split()
MAX_POSITIONS = 32  # the text model's positions: RoBERTa offsets them by pad_token_id + 1

# A tiny RoBERTa text tower: what AutoConfig reads for `hf_model_name` with `hf_model_pretrained: false`.
TEXT_CONFIG = {"model_type": "roberta", "architectures": ["RobertaModel"], "vocab_size": len(SPECIAL) + len(WORDS),
               "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": MAX_POSITIONS + 2, "pad_token_id": 1, "bos_token_id": 0,
               "eos_token_id": 2, "type_vocab_size": 1}
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                    "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": MAX_POSITIONS}


def build_tokenizer() -> Tokenizer:
    """A word-level tokenizer over `WORDS` that wraps each text in <s> ... </s>, as RoBERTa's does."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer


def fill_hub_cache(hub_cache: Path, repo_id: str = TINY_HUB_ID) -> Path:
    """Write `repo_id` (tokenizer.json, tokenizer_config.json, config.json) into `hub_cache`; return its snapshot."""
    org, name = repo_id.split("/")
    repo = hub_cache / f"models--{org}--{name}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex name: the cache only needs refs/main to match
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (snapshot / "config.json").write_text(json.dumps(TEXT_CONFIG))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def tiny_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache holding `TINY_HUB_ID`; returns the cache folder.

    Sets HF_HUB_CACHE / HF_HUB_OFFLINE for subprocesses, and huggingface_hub's constants,
    which it reads once at import, for this one.
    """
    hub_cache = tmp_path / "hub"
    fill_hub_cache(hub_cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache
