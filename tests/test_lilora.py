"""LiLoRA: the gated up-projection sigma(f) B_sh + (1 - sigma(f)) B_t A_t inside the shared A, what each
task trains (B_sh only in the first task), the reconstructed cosine stability term on a hand case, and
a whole run that evaluates each task with its own branch (the official protocol gives the task id)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import ModelInfo, StreamInfo
from jaxtree_lora.methods.lilora import LiLoRA
from jaxtree_lora.models.common import Site

from test_loop import assert_learns, learning_config, make_run, tiny_config, xor_stream

INFO = ModelInfo(sites={"q": Site(3, 2)}, num_layers=1, feature_dim=3)
STREAM = StreamInfo(num_tasks=2, max_tasks=2, kind="classification")


def test_delta_is_the_gated_mix_inside_the_shared_a():
    method = LiLoRA(lora=lora_lib.LoraSpec(targets=("q",), rank=2, alpha=4.0, dropout=0.0), sub_rank=1)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, STREAM)
    rng = np.random.default_rng(0)
    a_sh, b_sh = rng.normal(size=(2, 3)), rng.normal(size=(2, 2))
    a_sp, b_sp = rng.normal(size=(2, 1, 2)), rng.normal(size=(2, 2, 1))
    fusion = np.array([0.3, -1.2])
    adapters = {"q": {"a_sh": jnp.asarray(a_sh[None], jnp.float32), "b_sh": jnp.asarray(b_sh[None], jnp.float32),
                      "a_sp": jnp.asarray(a_sp[None], jnp.float32), "b_sp": jnp.asarray(b_sp[None], jnp.float32),
                      "fusion": jnp.asarray(fusion[None], jnp.float32)}}
    _, state = method.begin_task(adapters, state, 1)
    x = rng.normal(size=(4, 3))
    layer = jax.tree.map(lambda leaf: leaf[0], method.forward_adapters(adapters, state)["q"])
    got = np.asarray(method.delta(state, "q", layer, jnp.asarray(x, jnp.float32), None))
    gate = 1.0 / (1.0 + np.exp(1.2))
    up = gate * b_sh + (1 - gate) * b_sp[1] @ a_sp[1]
    np.testing.assert_allclose(got, 2.0 * x @ a_sh.T @ up.T, rtol=1e-5, atol=1e-5,
                               err_msg="scale * [sig(f_t) B_sh + (1 - sig(f_t)) B_t A_t] A_sh x with task 1's branch")


def test_what_each_task_trains():
    method = LiLoRA(lora=lora_lib.LoraSpec(targets=("q",), rank=2), sub_rank=1)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, STREAM)
    trainable = {"adapters": adapters, "head": {}}
    for task, b_shared in ((0, 1.0), (1, 0.0)):
        _, state = method.begin_task(adapters, state, task)
        mask = method.update_mask(state, trainable)["adapters"]["q"]
        assert float(mask["b_sh"]) == b_shared, "B_sh trains in the first task only"
        assert float(mask["a_sh"]) == 1.0, "A_sh trains in every task (the official code)"
        np.testing.assert_array_equal(np.asarray(mask["fusion"])[0], np.eye(2)[task], err_msg="only this task's slot")
    with pytest.raises(ConfigError, match="sub_rank"):
        LiLoRA(lora=lora_lib.LoraSpec(rank=2), sub_rank=3)


def test_stability_term_is_one_minus_cosine_of_the_shared_projections():
    method = LiLoRA(lora=lora_lib.LoraSpec(targets=("q",), rank=2), sub_rank=1, stability=1.0)
    adapter = {"a_sh": jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
               "a_sh_prev": jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])}
    x = jnp.asarray([[[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [5.0, 5.0, 5.0]]])  # third token is padding
    weight = jnp.asarray([[1.0, 1.0, 0.0]])
    # token 1: now (1, 1), before (1, 0): cos = 1/sqrt 2. token 2: now (1, 0), before (1, 1): cos = 1/sqrt 2.
    got = np.asarray(method.record({}, "q", adapter, x, weight))
    np.testing.assert_allclose(got, [2 * (1 - 1 / np.sqrt(2)), 2.0], rtol=1e-6)


@pytest.mark.parametrize("stability", [0.0, 0.5])
def test_run_learns_with_its_own_branch_per_task(stability, tmp_path):
    config = learning_config("lilora")
    config.method.lilora.sub_rank = 1
    config.method.lilora.stability = stability
    run = make_run(config, tmp_path / "run", stream=xor_stream())
    outcome = run.fit()
    assert run.train_step._cache_size() == 1, "a new task compiled the train step again"
    assert_learns(run, outcome)
    assert run.method.describe()["inference_rule"] == "GIVEN_TASK_SLOT"
    state = outcome["state"]
    a_sh = np.asarray(state.trainable["adapters"]["attn.query"]["a_sh"])
    np.testing.assert_array_equal(np.asarray(state.method_state["a_sh_prev"]["attn.query"]), a_sh,
                                  err_msg="the previous shared A is stored at each task end")


def lilora_config(**eval_options):
    config = tiny_config("lilora")
    config.method.lilora.sub_rank = 1
    config.eval.update(eval_options)
    return config


def test_inferred_identity_scores_each_example_with_its_own_tasks_branch(tmp_path):
    """The per-example selection in the evaluator's _predict_fn against the given-identity path, example by
    example, for both classifiers it returns (the method's protocol and the nearest class mean)."""
    run = make_run(lilora_config(), tmp_path / "run")
    state = run.fit()["state"]
    arrays = {"input_ids": np.concatenate([t.test.inputs["input_ids"][:4] for t in run.stream.tasks]),
              "attention_mask": np.concatenate([t.test.inputs["attention_mask"][:4] for t in run.stream.tasks])}
    batch = run._host_batch(arrays)
    tasks = np.asarray([0, 2, 1, 0, 1, 2, 2, 0, 1, 1, 0, 2], np.int32)
    from jaxtree_lora.evaluation.evaluator import Evaluator

    predict = run.evaluator._predict  # the run's rule: the given task's slot
    given_evaluator = run.evaluator
    inferring = Evaluator(backbone=run.backbone, method=run.method, stream=run.stream, protocol=run.protocol,
                          consts=run.consts, frozen=run.frozen, host_batch=given_evaluator.host_batch,
                          out_sharding=given_evaluator._out_sharding, identity="inferred",
                          batches=given_evaluator.batches)  # eval.task_identity=inferred: the inferred task's slot
    mixed = np.asarray(inferring._predict(state.trainable, run.frozen, run.consts, state.method_state,
                                          state.prototypes, batch, 2, jnp.asarray(tasks)))
    for k in range(3):
        given = np.asarray(predict(state.trainable, run.frozen, run.consts,
                                   {**state.method_state, "task": jnp.asarray(k, jnp.int32)},
                                   state.prototypes, batch, 2, None, jnp.asarray(k, jnp.int32)))
        np.testing.assert_array_equal(mixed[:, tasks == k], given[:, tasks == k],
                                      err_msg=f"examples assigned to task {k} were not scored with its branch")


def test_inferred_identity_matches_given_wherever_every_task_is_inferred_right(tmp_path):
    """Same training, evaluation differing only in where the identity comes from: wherever every test
    example of a task had its task inferred right, the score equals the given-identity run's exactly.
    The synthetic classes draw tokens from disjoint vocabulary slices, so even the random tiny model's
    pre-trained class means tell most examples' tasks apart."""
    records = []
    inferred = make_run(lilora_config(task_identity="inferred"), tmp_path / "inferred", logger=records.append).fit()
    given = make_run(lilora_config(), tmp_path / "given").fit()
    identity = [r["task_identity_accuracy"] for r in records if r["type"] == "task"]
    assert [len(row) for row in identity] == [1, 2, 3], "one identity accuracy per seen task after each task"
    assert np.mean([v for row in identity for v in row]) > 75.0, identity
    exact = [(seen, upto) for upto, row in enumerate(identity) for seen, value in enumerate(row) if value == 100.0]
    assert len(exact) >= 3, identity
    for seen, upto in exact:
        assert inferred["matrix"][seen, upto] == given["matrix"][seen, upto], (seen, upto)


def test_inferred_identity_on_an_instruction_stream_names_the_fix(tmp_path):
    from jaxtree_lora.data import get_stream
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run
    from test_paper_configs import write_tiny_llama_and_trace

    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC",), train_rows=4)
    config = lilora_config(task_identity="inferred")
    config.model.name, config.model.kind, config.model.path = "hf", "decoder", llama
    config.lora.targets = ["attn.q_proj"]
    config.data = dict(name="trace", root=trace, tasks=["FOMC"], max_prompt_len=8, max_answer_len=2)
    backbone = backbone_lib.build(config)
    with pytest.raises(ConfigError, match="needs a classification stream"):
        Run(config=config, backbone=backbone, stream=get_stream(config.data, backbone.tokenizer),
            workdir=str(tmp_path / "run"), progress=False)
