import pytest
import torch

from sc_steer import ScSteerError, Site, open_model
from sc_steer.models import unwrap


@pytest.mark.parametrize("family, layers", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                            ("gpt_neox", "gpt_neox.layers")])
def test_open_local_folder_and_resolve_sites(tiny_model_dirs, family, layers):
    lm = open_model(str(tiny_model_dirs[family]))
    assert lm.n_layers == 3 and lm.d_model == 32
    assert lm.module_path(Site("resid_post", 2)) == f"{layers}.2"
    assert lm.module(Site("mlp_out", 1)) is lm.hf.get_submodule(f"{layers}.1.mlp")
    assert [str(s) for s in lm.sites("resid_post.*")] == ["resid_post.0", "resid_post.1", "resid_post.2"]
    assert lm.fingerprint()["model_type"] == family


def test_dtype_option(tiny_model_dirs):
    assert open_model(str(tiny_model_dirs["llama"]), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ScSteerError, match="dtype 'float8'"):
        open_model(str(tiny_model_dirs["llama"]), dtype="float8")


def test_missing_path_and_foreign_folder(tmp_path):
    with pytest.raises(ScSteerError, match="does not exist"):
        open_model(str(tmp_path / "nope"))
    with pytest.raises(ScSteerError, match="no config.json"):
        open_model(str(tmp_path))


def test_unknown_architecture_says_how_to_add_an_adapter(tmp_path, tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(ScSteerError, match=r"unsupported architecture 'opt'.*ADAPTERS"):
        open_model(str(tmp_path))


def test_unwrap_never_takes_batch_row_zero():
    x = torch.randn(3, 4, 5)
    assert unwrap(x) is x
    assert unwrap((x, None)) is x
