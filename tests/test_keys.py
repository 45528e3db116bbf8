"""PRNG keys by purpose (issue 13): initialisation, training steps, generation and the draws inside a
step come from distinct keys. With partitionable threefry `split(k, n)[i] == fold_in(k, i)`, so a
first-level tag that is a small integer collides with a task index: these tests would catch
generation reusing task 7's step keys, or the initialisation reusing task 1's."""
import jax
import numpy as np
import pytest

from jaxtree_lora import keys

from test_loop import make_run, tiny_config

TASKS = range(21)


def as_bytes(key) -> bytes:
    return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).tobytes()


def test_split_is_fold_in_so_small_first_level_tags_collide():
    """The premise of the purpose tags: if this stops holding the tags are still right, but the
    collisions the other tests guard against would take another form."""
    base = jax.random.PRNGKey(3)
    assert as_bytes(jax.random.split(base, 8)[7]) == as_bytes(jax.random.fold_in(base, 7))


def test_keys_of_different_purposes_are_distinct_for_tasks_0_to_20():
    seed = 0
    init = keys.for_purpose(seed, "init")
    named = {"init": init, "generate": keys.for_purpose(seed, "generate"),
             "train": keys.for_purpose(seed, "train")}
    for index, child in enumerate(jax.random.split(init, 2)):  # initial_state's adapter and head keys
        named[f"init/{index}"] = child
    train = named["train"]
    for task in TASKS:
        named[f"train/task{task}"] = jax.random.fold_in(train, task)
        for epoch in range(3):
            named[f"train/task{task}/epoch{epoch}"] = jax.random.fold_in(jax.random.fold_in(train, task), epoch)
            for batch in range(3):
                named[f"train/task{task}/epoch{epoch}/batch{batch}"] = keys.train_step_key(seed, task, epoch, batch)
        named[f"generate/upto{task}"] = jax.random.fold_in(named["generate"], task)
        for evaluated in TASKS:
            named[f"generate/upto{task}/task{evaluated}"] = keys.generation_key(seed, task, evaluated)
    seen = {}
    for name, key in named.items():
        assert as_bytes(key) not in seen, f"{name} reuses the key of {seen.get(as_bytes(key))}"
        seen[as_bytes(key)] = name
    # The two collisions of issue 13, by name.
    assert as_bytes(keys.for_purpose(seed, "generate")) != as_bytes(named["train/task7"])
    assert as_bytes(init) != as_bytes(named["train/task1"])


def test_purpose_tags_are_stable_and_far_from_small_indices():
    # A stable hash (not Python's per-process hash()): the same seed gives the same run in every process.
    assert keys.tag("train") == int.from_bytes(__import__("hashlib").sha256(b"train").digest()[:4], "big")
    for name in ("init", "train", "generate", "dropout", "loda_lookahead", "treelora_selection"):
        assert keys.tag(name) > 10 ** 6, f"{name}'s tag could equal a task, epoch, batch or layer index"


def test_draws_inside_a_step_do_not_reuse_dropout_keys():
    """Adapter dropout folds small layer and site indices under derive(step, "dropout"); LoDA's split and
    TreeLoRA's selection draw from their own purposes (before: fold_in(step, 11) and fold_in(step, 7),
    which were the dropout keys of layers 11 and 7)."""
    step = keys.train_step_key(0, 2, 0, 5)
    dropout = keys.derive(step, "dropout")
    taken = {as_bytes(jax.random.fold_in(jax.random.fold_in(dropout, layer), site))
             for layer in range(32) for site in range(8)}
    taken |= {as_bytes(jax.random.fold_in(dropout, layer)) for layer in range(32)}
    for name in ("loda_lookahead", "treelora_selection"):
        own = keys.derive(step, name)
        for key in (own, *jax.random.split(own, 2)):
            assert as_bytes(key) not in taken, f"{name} reuses a dropout key"


def test_the_loop_draws_its_keys_by_purpose(tmp_path):
    """Run.initial_state and Run.fit use keys.for_purpose / keys.train_step_key (and not the seed's key
    with small first-level tags)."""
    config = tiny_config("seqlora", epochs=1)
    config.seed = 5
    run = make_run(config, tmp_path / "run")
    method = run.method
    init_keys = []
    original_init = method.init
    # initial_state runs under jit: the key reaches the host through a callback.
    object.__setattr__(method, "init", lambda key, *rest: (
        jax.debug.callback(lambda value: init_keys.append(np.asarray(value)), key), original_init(key, *rest))[1])
    step_keys = []
    original_step = run.train_step
    run.train_step = lambda state, frozen, consts, batch, key: (step_keys.append(key),
                                                                original_step(state, frozen, consts, batch, key))[1]
    run.fit()
    assert as_bytes(init_keys[0]) == as_bytes(jax.random.split(keys.for_purpose(5, "init"))[0])
    per_task = len(step_keys) // run.num_tasks
    expected = [keys.train_step_key(5, task, 0, batch) for task in range(run.num_tasks) for batch in range(per_task)]
    assert [as_bytes(k) for k in step_keys] == [as_bytes(k) for k in expected]


def test_generation_draws_from_the_generate_purpose(tmp_path):
    from jaxtree_lora.data import get_stream
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run
    from test_paper_configs import write_tiny_llama_and_trace

    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC",), train_rows=4)
    config = tiny_config("seqlora")
    config.seed = 5
    config.model.name, config.model.kind, config.model.path = "hf", "decoder", llama
    config.lora.targets = ["attn.q_proj"]
    config.data = dict(name="trace", root=trace, tasks=["FOMC"], max_prompt_len=8, max_answer_len=2)
    backbone = backbone_lib.build(config)
    run = Run(config=config, backbone=backbone, stream=get_stream(config.data, backbone.tokenizer),
              workdir=str(tmp_path / "run"), progress=False)
    drawn = []

    class Drawn(Exception):
        pass

    def generate(trainable, frozen, method_state, prompt_ids, prompt_mask, key, *limits):  # limit, max_new_tokens
        drawn.append(key)
        raise Drawn

    run.evaluator._generate = generate
    with pytest.raises(Drawn):
        run.fit()  # trains the one task, then evaluates it: the loop hands the evaluator its key
    # The first evaluation batch's key: fold_in(generation key, batch number 0).
    assert as_bytes(drawn[0]) == as_bytes(jax.random.fold_in(keys.generation_key(5, 0, 0), 0))


def test_host_derived_step_and_generation_keys_equal_jax_fold_in():
    """The purpose, step and generation keys are derived on the host (an eager fold_in is a program, and
    one queued behind the running step makes the host wait for the device every step). They must be
    JAX's bits: a difference would change every initial weight, dropout mask and sample of every run."""
    def jax_chain(seed, name, *indices):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), keys.tag(name))  # JAX's own derivation
        for index in indices:
            key = jax.random.fold_in(key, index)
        return np.asarray(key)

    rng = np.random.default_rng(0)
    cases = [(0, 0, 0, 0), (5, 2, 0, 5), (2 ** 31 - 1, 2 ** 31 - 1, 7, 2 ** 31 - 1)]
    cases += [tuple(int(v) for v in rng.integers(0, 2 ** 31, 4)) for _ in range(20)]
    for seed, task, epoch, batch in cases:
        for name in ("init", "train", "generate"):
            purpose = keys.for_purpose(seed, name)
            assert purpose.dtype == np.uint32 and purpose.shape == (2,)
            assert np.asarray(purpose).tobytes() == jax_chain(seed, name).tobytes(), (seed, name)
        step = keys.train_step_key(seed, task, epoch, batch)
        assert isinstance(step, np.ndarray) and step.dtype == np.uint32, "derived on the host, as raw key data"
        assert step.tobytes() == jax_chain(seed, "train", task, epoch, batch).tobytes(), (seed, task, epoch, batch)
        assert keys.generation_key(seed, task, batch).tobytes() == jax_chain(seed, "generate", task, batch).tobytes()


def test_step_keys_take_no_device_program(monkeypatch):
    """With JAX's default keys no jax.random call (a dispatched program) is made for a step key."""
    def refuse(*args, **kwargs):
        raise AssertionError("a step key went through a device program")

    for name in ("fold_in", "PRNGKey", "key"):
        monkeypatch.setattr(jax.random, name, refuse)
    assert keys.train_step_key(9, 1, 0, 4).shape == (2,)
    assert keys.generation_key(9, 1, 0).shape == (2,)
    assert keys.for_purpose(9, "init").shape == (2,)
