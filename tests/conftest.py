"""Shared fixtures: tiny random models of each supported family, saved to disk like real checkpoints.

The tokenizer is the demo model's own BPE tokenizer (trained locally, shipped in the package), so
nothing is downloaded.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DEMO_DIR = __import__("sc_steer.models", fromlist=["demo_model_path"]).demo_model_path()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_DIR)


def _configs(vocab):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    return {
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=2, pad_token_id=3),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=512,
                           bos_token_id=1, eos_token_id=2),
        "gpt_neox": GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, max_position_embeddings=512, bos_token_id=1,
                                  eos_token_id=2),
    }


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer):
    """{family: folder} with a random tiny causal LM + the demo tokenizer saved in each."""
    from transformers import AutoModelForCausalLM

    out = {}
    for family, cfg in _configs(len(tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture
def text_docs():
    """A few short documents with digits, punctuation and names."""
    return [
        "Ge1:1 In the beginning God created the heaven and the earth.\nGe1:2 And the earth was without form.",
        "HAMLET. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
        "cat, true cat (noun): feline mammal usually having thick soft fur and no ability to roar.",
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36.",
    ]
