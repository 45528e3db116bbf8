"""The real offline models against reference outputs of an independent implementation (PyTorch +
transformers, tests/fixtures/make_reference_outputs.py). Skipped when the assets are not installed."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

assets = pytest.importorskip("jaxtree_lora.assets")
HERE = os.path.join(os.path.dirname(__file__), "fixtures")


def asset(name):
    try:
        return str(assets.path(name))
    except assets.AssetMissing:
        pytest.skip(f"asset {name} not installed (jaxtree-lora assets)")


@pytest.mark.assets
def test_minilm_matches_pytorch():
    from jaxtree_lora.models import bert

    with open(os.path.join(HERE, "minilm_reference.json")) as f:
        reference = json.load(f)
    model, tokenizer = bert.load_hf(asset("minilm"))
    encoded = tokenizer(reference["sentences"], padding=True, return_tensors="np")
    assert encoded["input_ids"].tolist() == reference["input_ids"], "tokenizer ids differ from transformers'"
    pooled = jax.jit(lambda ids, mask: model.features(ids, mask))(encoded["input_ids"], encoded["attention_mask"])
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(reference["mean_pooled"]), atol=2e-5)


@pytest.mark.assets
def test_smollm2_gguf_matches_pytorch():
    from jaxtree_lora.models import gguf
    from jaxtree_lora.models.generate import generate

    with open(os.path.join(HERE, "smollm2_reference.json")) as f:
        reference = json.load(f)
    model, tokenizer = gguf.load_gguf(asset("smollm2"))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    for prompt, ids, top, rows in zip(reference["prompts"], reference["token_ids"], reference["last_logits_top"],
                                      reference["logits_rows"]):
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids, "GGUF tokenizer differs"
        logits = np.asarray(forward(params, jnp.asarray([ids])))[0]
        np.testing.assert_allclose(logits[-1][top["ids"]], top["values"], atol=2e-3)
        for position, values in zip(rows["positions"], rows["values"]):
            np.testing.assert_allclose(logits[position][:64], values, atol=2e-3)
        assert int(np.argmax(logits[-1])) == top["ids"][0]
    prompt = jnp.asarray([reference["chat_prompt_ids"]])
    run = jax.jit(lambda p, ids, mask: generate(nnx.merge(graphdef, p), ids, mask, max_new_tokens=12, temperature=0.0,
                                                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id))
    tokens = np.asarray(run(params, prompt, jnp.ones_like(prompt)))[0].tolist()
    expected = reference["greedy_continuation_ids"]
    assert tokens[:len(expected)] == expected[:len(tokens)], "greedy continuation differs from transformers'"
    assert "Paris" in tokenizer.decode(tokens, skip_special_tokens=True)
