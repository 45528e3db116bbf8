"""The PEFT export loads in PEFT: an adapter exported by `lora.export_peft` (what `jaxtree-lora export`
writes) into `PeftModel.from_pretrained` on the same Hugging Face checkpoint gives the logits our
model gives with that adapter. Needs the `bench` extra (torch, peft); skipped without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from jaxtree_lora import lora as lora_lib  # noqa: E402
from jaxtree_lora.models import llama  # noqa: E402

from test_llama import make_checkpoint, write_checkpoint  # noqa: E402


def test_exported_adapter_loaded_by_peft_gives_our_logits(tmp_path):
    from transformers import LlamaForCausalLM

    config, tensors = make_checkpoint("llama")
    directory = write_checkpoint(str(tmp_path / "base"), config, tensors)
    model, _ = llama.load_hf(directory)
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj", "mlp.down_proj"), rank=2, alpha=4.0)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, model.lora_sites(), 2)
    for index, site in enumerate(adapters):  # B is zero at init: give it values, so the adapter does something
        adapters[site]["b"] = 0.5 * jax.random.normal(jax.random.PRNGKey(index + 1), adapters[site]["b"].shape)
    lora_lib.export_peft(str(tmp_path / "adapter"), adapters, spec, model.hf_module_path, base_model=directory)

    tokens = np.asarray([[1, 5, 9, 2, 7, 3], [4, 4, 8, 15, 16, 23]])
    ours = np.asarray(model(jnp.asarray(tokens), adapters=adapters,
                            delta=lambda site, adapter, x, key: lora_lib.apply(adapter, x, spec.scale)))
    plain = np.asarray(model(jnp.asarray(tokens)))
    base = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = adapted(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4,
                               err_msg="PEFT with the exported adapter differs from our model with it")
