"""KV-cached generation against recomputation: every generated token must be what a full forward
pass over the sequence so far would choose."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models import llama
from jaxtree_lora.models.generate import generate

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, max_position=64, rope_theta=100.0)
    module = llama.LlamaDecoder(config, rngs=nnx.Rngs(3))
    # Weights of unit-ish scale instead of the 0.02 init: every layer matters and greedy choices are
    # well separated (no near-ties that float rounding could flip).
    module.embed.set_value(module.embed[...] * 50)
    module.lm_head.set_value(module.lm_head[...] * 50)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        getattr(module.layers, name).set_value(getattr(module.layers, name)[...] * 15)
    return module


PROMPTS = [[5, 9, 13], [7, 1, 22, 30, 2]]


def left_pad(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    return jnp.asarray(ids), jnp.asarray(mask)


def greedy_by_recomputation(model, prompt, steps, width=16):
    """Greedy tokens, each from a full forward pass over the sequence so far (right-padded to a
    fixed width, which a causal model's earlier positions do not see, so one compilation serves)."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    sequence = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(sequence)] = sequence
        sequence.append(int(np.argmax(np.asarray(forward(params, padded))[0, len(sequence) - 1])))
    return sequence[len(prompt):]


def jitted_generate(model, **options):
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, ids, mask, key: generate(nnx.merge(graphdef, p), ids, mask, key=key, **options))
    return lambda ids, mask, key=jax.random.PRNGKey(0): np.asarray(run(params, ids, mask, key))


def test_greedy_cached_generation_equals_full_recomputation(model):
    ids, mask = left_pad(PROMPTS)
    tokens = jitted_generate(model, max_new_tokens=6, temperature=0.0, eos_id=-1, pad_id=0)(ids, mask)
    assert tokens.shape == (2, 6) and tokens.dtype == np.int32
    for row, prompt in enumerate(PROMPTS):
        assert tokens[row].tolist() == greedy_by_recomputation(model, prompt, 6), (
            f"row {row}: cached, left-padded generation differs from argmax over full forward passes")


def test_tokens_after_eos_are_padding(model):
    ids, mask = left_pad(PROMPTS)
    free = jitted_generate(model, max_new_tokens=6, temperature=0.0, eos_id=-1, pad_id=0)(ids, mask)
    eos = int(free[1, 2])  # make row 1's third token the EOS
    stopped = jitted_generate(model, max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=39)(ids, mask)
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else 6
        assert stopped[row, :end].tolist() == free[row, :end].tolist(), f"row {row}: tokens up to EOS changed"
        assert (stopped[row, end:] == 39).all(), f"row {row}: tokens after EOS are not pad_id"
    several = jitted_generate(model, max_new_tokens=6, temperature=0.0, eos_id=(-5, eos), pad_id=39)(ids, mask)
    np.testing.assert_array_equal(several, stopped, err_msg="a list of EOS ids must stop like the single id")


def test_sampling_is_keyed_and_follows_the_softmax(model):
    ids, mask = left_pad(PROMPTS)
    run = jitted_generate(model, max_new_tokens=4, temperature=0.7, eos_id=-1, pad_id=0)
    first = run(ids, mask, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(first, run(ids, mask, jax.random.PRNGKey(1)), err_msg="same key, other tokens")
    assert not np.array_equal(first, run(ids, mask, jax.random.PRNGKey(2))), "another key gave the same tokens"


def softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def test_sampled_tokens_follow_softmax_of_logits_over_the_temperature():
    """The first sampled token's frequencies over 4000 keys against softmax(logits / T). The head is
    scaled so that the logits are spread (std ~1, top probability ~0.35 at T = 0.7): there a wrong
    temperature (T ignored, or applied twice or as a product) moves the distribution by far more than
    the sampling noise, so the test tells the temperatures apart."""
    config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, max_position=64, rope_theta=100.0)
    spread = llama.LlamaDecoder(config, rngs=nnx.Rngs(3))
    spread.lm_head.set_value(spread.lm_head[...] * 12)
    ids, mask = left_pad(PROMPTS)
    temperature, draws = 0.7, 4000
    graphdef, params = nnx.split(spread)
    sample_first = jax.jit(jax.vmap(lambda key: generate(nnx.merge(graphdef, params), ids, mask, max_new_tokens=1,
                                                         temperature=temperature, key=key, eos_id=-1, pad_id=0)[:, 0]))
    tokens = np.asarray(sample_first(jax.random.split(jax.random.PRNGKey(0), draws)))  # [draws, 2]
    logits = np.asarray(spread(ids, mask), np.float64)[:, -1]
    for row in range(2):
        frequency = np.bincount(tokens[:, row], minlength=VOCAB) / draws
        distance = lambda t: 0.5 * np.abs(frequency - softmax(logits[row] / t)).sum()  # total variation
        # Sampling noise: the expected total variation of 4000 draws over these 40 tokens is ~0.03.
        assert distance(temperature) < 0.06, f"row {row}: samples do not follow softmax(logits / {temperature})"
        for wrong in (1.0, temperature ** 2, 2 * temperature):
            assert distance(wrong) > 0.1, f"row {row}: T = {wrong} is as close as T = {temperature}: a weak check"


def test_generation_with_adapter_equals_merged_kernel(model):
    spec = lora_lib.LoraSpec(targets=("attn.v_proj",), rank=2, alpha=4.0)
    adapters = lora_lib.init(jax.random.PRNGKey(4), spec, model.lora_sites(), 2)
    adapters["attn.v_proj"]["b"] = jax.random.normal(jax.random.PRNGKey(5), adapters["attn.v_proj"]["b"].shape)
    delta = lambda site, adapter, x, key: lora_lib.apply(adapter, x, spec.scale)
    ids, mask = left_pad(PROMPTS)
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, a: generate(nnx.merge(graphdef, p), ids, mask, max_new_tokens=5, eos_id=-1, pad_id=0,
                                        adapters=a, delta=delta))
    adapted = np.asarray(run(params, adapters))
    merged = nnx.clone(model)  # nnx.merge outside jit would share (and so alter) the fixture's variables
    merged.layers.v_proj.set_value(lora_lib.merge(merged.layers.v_proj[...], adapters["attn.v_proj"], spec.scale))
    expected = [greedy_by_recomputation(merged, prompt, 5) for prompt in PROMPTS]
    assert adapted.tolist() == expected, "generation ignored the adapter or applied it differently from merging"
    plain = generate(model, ids, mask, max_new_tokens=5, eos_id=-1, pad_id=0)
    assert not np.array_equal(adapted, np.asarray(plain)), "the adapter should change this generation"


def test_bad_arguments_raise(model):
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0, eos_id=2, pad_id=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, mask, max_new_tokens=2, temperature=-1.0, eos_id=2, pad_id=0)


SHARED = [[3, 8, 11, 5, 9, 13], [3, 8, 11, 7, 1, 22, 30, 2], [3, 8, 11, 6]]


def test_a_shared_prefix_prefilled_once_generates_what_the_whole_prompts_generate(model):
    """Prompts [prefix + own part]: the prefix given apart (prefilled once at batch 1, copied into every
    row's cache, left-padded to a wider width) must give the tokens of the whole prompts, each of them
    what full recomputation chooses; the rows hold only their own parts."""
    ids, mask = left_pad(SHARED)
    whole = jitted_generate(model, max_new_tokens=5, temperature=0.0, eos_id=-1, pad_id=0)(ids, mask)
    own_ids, own_mask = left_pad([prompt[3:] for prompt in SHARED])
    prefix_ids, prefix_mask = left_pad([[0, 0] + SHARED[0][:3]])  # 2 pad columns before the prefix
    mask_ = np.asarray(prefix_mask)[0].copy()
    mask_[:2] = 0
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, ids, mask, prefix, prefix_mask: generate(
        nnx.merge(graphdef, p), ids, mask, max_new_tokens=5, temperature=0.0, eos_id=-1, pad_id=0,
        prefix_ids=prefix, prefix_mask=prefix_mask))
    split = np.asarray(run(params, own_ids, own_mask, prefix_ids[0], jnp.asarray(mask_)))
    np.testing.assert_array_equal(split, whole, err_msg="a prefix given apart changed the generated tokens")
    for row, prompt in enumerate(SHARED):
        assert split[row].tolist() == greedy_by_recomputation(model, prompt, 5), f"row {row}"


def test_shared_prompts_split_batch_by_length_and_put_the_answers_back_in_order():
    """SharedPrompts: the prefix every row shares (each row keeping one token of its own), rows batched
    shortest own part first, and generate_and_score puts each answer back at its prompt's index."""
    import types

    from jaxtree_lora.evaluation import generation

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 20 + k] + [30] * (k % 3) for k in range(5)]
    ids, mask = (np.asarray(a) for a in left_pad(prompts))
    assert generation.shared_prefix_length(ids, mask) == 9
    assert generation.shared_prefix_length(ids[:1], mask[:1]) == len(prompts[0]) - 1, "one row keeps its last token"
    split = types.SimpleNamespace(arrays={"prompt_ids": ids, "prompt_mask": mask}, answers=[str(k) for k in range(5)],
                                  prompts=[str(p) for p in prompts])
    task = types.SimpleNamespace(index=0, name="t", test=split, metric="accuracy")
    shared = generation.SharedPrompts.for_stream([task], pad=0, batch_size=2)
    assert shared.prefix_ids[0][-9:].tolist() == list(range(1, 10)) and shared.prefix_mask[0].sum() == 9
    batches = list(shared.batches(0, 2))
    assert [b["weight"].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    own = [b["prompt_mask"].sum(1).tolist() for b in batches]
    assert own[0] == [1, 1] and own[1] == [2, 2], f"shortest own parts first: {own}"
    # The "generator" answers each row with its own last token - 20 (the row's index): the answers
    # must come back in the test split's order whatever order the batches held them in.
    score, answers = generation.generate_and_score(
        task, batches,
        lambda batch, number: np.asarray([[int(r[m > 0][0]) - 20] for r, m in zip(batch["prompt_ids"], batch["prompt_mask"])]),
        lambda tokens: str(tokens[0]))
    assert answers == ["0", "1", "2", "3", "4"] and score == 100.0


def test_evaluation_with_shared_prefixes_answers_as_whole_prompts_do(tmp_path, monkeypatch):
    """A run's generation evaluation with `eval.share_prefix` (prefix prefilled once, rows by length)
    must give every prompt the answer that the whole, unsplit prompts give, in the test split's order."""
    import json

    from jaxtree_lora.data import get_stream
    from jaxtree_lora.evaluation import generation
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run
    from test_llama import make_checkpoint, write_checkpoint
    from test_loop import tiny_config

    hf_config, tensors = make_checkpoint("llama")
    write_checkpoint(str(tmp_path / "llama"), hf_config, tensors)
    for task in ("C-STANCE", "FOMC"):
        (tmp_path / "trace" / task).mkdir(parents=True)
        for split in ("train", "eval", "test"):
            # A 10-word instruction every prompt of the task shares, then 1 to 6 words of its own.
            records = [{"prompt": " ".join([f"w{j}" for j in range(10)] + [f"w{(i * 7 + j) % 40}" for j in range(1 + i % 6)]),
                        "answer": f"w{i % 3}"} for i in range(9)]
            (tmp_path / "trace" / task / f"{split}.json").write_text(json.dumps(records))
    answers = {}
    original = generation.generate_and_score

    def recording(task, *args, **kwargs):
        score, predictions = original(task, *args, **kwargs)
        answers.setdefault(share, []).append(predictions)
        return score, predictions

    monkeypatch.setattr(generation, "generate_and_score", recording)
    for share in (False, True):
        config = tiny_config("seqlora")
        config.model.name, config.model.kind, config.model.path = "hf", "decoder", str(tmp_path / "llama")
        config.lora.targets = ["attn.q_proj"]
        config.data = dict(name="trace", root=str(tmp_path / "trace"), tasks=["C-STANCE", "FOMC"], max_prompt_len=20,
                           max_answer_len=3)
        config.eval.batch_size, config.eval.share_prefix = 4, share
        backbone = backbone_lib.build(config)
        run = Run(config=config, backbone=backbone, stream=get_stream(config.data, backbone.tokenizer),
                  workdir=str(tmp_path / f"run{share}"), progress=False)
        assert (run.evaluator.shared_prompts() is not None) == share, "the shared path must be the one tested"
        state = run.initial_state()
        for task in (0, 1):
            run.evaluator._generation_score(state, task, None)
    assert len(answers[True]) == 2 and answers[True] == answers[False]
    assert len(set(answers[True][0])) > 1, "the prompts' answers differ: the order is checked"
