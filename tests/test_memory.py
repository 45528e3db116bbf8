"""The memory planner: byte counts of abstract pytrees and the activation formula checked by hand,
FSDP dividing the frozen weights, and a plan that does not fit refused with its numbers."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jaxtree_lora.train import memory


def abstract(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_plan_counts_bytes_by_hand():
    frozen = {"w": abstract((1024, 1024), jnp.bfloat16), "b": abstract((1024,), jnp.float32)}  # 2 MiB + 4 KiB
    trainable = {"a": abstract((8, 1024), jnp.float32), "b": abstract((1024, 8), jnp.float32)}  # 64 KiB
    method = {"bank": abstract((4, 2, 8192), jnp.float32)}  # 256 KiB
    plan = memory.plan(frozen, trainable, method, kind="encoder", hidden=64, heads=4, layers=2, seq=16,
                       micro_batch=8, data_parallel=2, fsdp=2, compute_bytes=2, capacity_bytes=None, check=False)
    assert plan.frozen_bytes == (2 * 1024 * 1024 + 4 * 1024) / 2, "frozen weights divided over fsdp"
    assert plan.trainable_bytes == 64 * 1024 and plan.optimizer_bytes == 2 * 64 * 1024, "Adam: two moments"
    assert plan.method_bytes == 4 * 2 * 8192 * 4
    # Per-device micro-batch 8 / (2 * 2) = 2; per layer 34*s*b*h + 5*a*s^2*b = 34*16*2*64 + 5*4*256*2.
    per_layer = 34 * 16 * 2 * 64 + 5 * 4 * 16 * 16 * 2
    assert plan.activation_bytes == 2 * per_layer
    assert plan.total == plan.frozen_bytes + plan.trainable_bytes + plan.optimizer_bytes + plan.method_bytes \
        + plan.activation_bytes
    remat = memory.activation_bytes("encoder", 64, 4, 2, 16, 2, remat=True)
    assert remat == 2 * 2 * 16 * 2 * 64 + per_layer, "remat keeps each block's input plus one block"
    assert "total per device" in plan.table()


def test_plan_that_does_not_fit_is_refused_with_the_numbers():
    frozen = {"w": abstract((4096, 4096, 16), jnp.bfloat16)}  # 0.5 GiB
    with pytest.raises(memory.PlanDoesNotFit, match=r"needs 0\.\d+ GiB per device but the device has 0\.25 GiB"):
        memory.plan(frozen, {}, {}, kind="decoder", hidden=64, heads=4, layers=2, seq=16, micro_batch=1,
                    data_parallel=1, fsdp=1, capacity_bytes=0.25 * 2 ** 30)
    fits = memory.plan(frozen, {}, {}, kind="decoder", hidden=64, heads=4, layers=2, seq=16, micro_batch=1,
                       data_parallel=1, fsdp=8, capacity_bytes=0.25 * 2 ** 30)
    assert fits.frozen_bytes == 2 ** 29 / 8, "FSDP over 8 devices makes the same model fit"


LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
# Parameters by hand: tied embedding + 16 x (q, o: h*h; k, v: h*kv*hd; gate, up, down: h*i; 2 norms) + norm.
LLAMA_3_2_1B_PARAMS = (128256 * 2048 + 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048)
                       + 2048)


def llama_1b_config_only(tmp_path):
    """A Llama-3.2-1B checkpoint directory holding only config.json: the planner needs nothing more."""
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_3_2_1B).save_pretrained(str(tmp_path / "llama1b"))
    return str(tmp_path / "llama1b")


def plan_cli(tmp_path, capsys, *argv):
    from jaxtree_lora import cli

    path = llama_1b_config_only(tmp_path)
    status = cli.main(["plan", "--config", "experiments/configs/trace_llama3_2_1b.py",
                       f"--config.model.path={path}", *argv])
    return status, capsys.readouterr()


def test_plan_reads_only_config_json_and_counts_llama_1b_by_hand(tmp_path, capsys):
    status, out = plan_cli(tmp_path, capsys, "--tpu_config", "gpu1")
    assert status == 0, out.err
    gib = 2 ** 30
    frozen = float(next(line.split()[2] for line in out.out.splitlines() if line.startswith("frozen weights")))
    assert abs(frozen - 4 * LLAMA_3_2_1B_PARAMS / gib) < 1e-3, "float32 frozen weights: 4 bytes per parameter"
    assert "device memory         79.600 GiB" in out.out and "fits:" in out.out


def test_plan_that_does_not_fit_is_one_line_and_fsdp_divides_the_weights(tmp_path, capsys):
    status, out = plan_cli(tmp_path, capsys, "--device_memory_gib", "4")
    assert status == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert "per device but the device has 4.00 GiB" in out.err and "raise fsdp" in out.err
    status, out = plan_cli(tmp_path, capsys, "--device_memory_gib", "4", "--config.train.mesh=[1,8,1]",
                           "--config.train.batch_size=8")
    frozen = float(next(line.split()[2] for line in out.out.splitlines() if line.startswith("frozen weights")))
    # Every big leaf splits over 8 (the norms, 2048 values each, stay whole): close to 1/8.
    assert abs(frozen - 4 * LLAMA_3_2_1B_PARAMS / 8 / 2 ** 30) < 0.01, frozen


@pytest.mark.parametrize("method", ["treelora", "inflora"])
def test_planned_weights_and_state_are_what_xla_compiles_the_step_with(method, tmp_path):
    """Independent of the planner's arithmetic: XLA's own count of the compiled train step's arguments
    (frozen weights, adapters, Adam moments, method state, plus a small batch) matches the plan's exact
    parts within 0.5%."""
    from jaxtree_lora.data.offline import TEXT_CLASSES
    from jaxtree_lora.train import mesh as mesh_lib
    from jaxtree_lora.train.loop import split_arrays
    from test_loop import make_run, tiny_config

    config = tiny_config(method)
    config.model.tiny = dict(hidden_size=128, intermediate_size=512, num_layers=3, vocab_size=2048)
    run = make_run(config, tmp_path / "run")
    state = run.initial_state()
    arrays = split_arrays(run.stream.tasks[0].train, run.kind)
    batch = next(run.batching.batches(arrays, run.micro_batch, seed=0, task=0, epoch=0))
    batch = mesh_lib.global_batch(batch, run.batch_sharding, 1, run.micro_batch)
    compiled = run.train_step.lower(state, run.frozen, run.consts, batch, jax.random.PRNGKey(0)).compile()
    arguments = compiled.memory_analysis().argument_size_in_bytes
    # The planner reads shapes from the config: describe the synthetic stream's 3 tasks x 2 classes.
    config.data = dict(name="offline-text-cil", num_tasks=len(run.stream.tasks),
                       classes=list(TEXT_CLASSES)[:run.stream.num_classes])
    config.train.fold_slots = False  # InfLoRA's folded kernel copy is a buffer beside the step's arguments
    plan = memory.plan_run(config, check=False)
    exact = plan.frozen_bytes + plan.trainable_bytes + plan.optimizer_bytes + plan.method_bytes
    assert abs(arguments / exact - 1) < 0.005, f"XLA's arguments {arguments} B, the plan's {exact} B"


def test_decoder_logits_are_planned_over_the_answer_window_only():
    """The loss takes the LM head over the answer positions, so the logits term scales with the
    answer length, not the sequence (4 bytes x 2 for logits and their gradient)."""
    full = memory.activation_bytes("decoder", 64, 4, 2, 128, 2, vocab=1000)
    window = memory.activation_bytes("decoder", 64, 4, 2, 128, 2, vocab=1000, answer_len=8)
    assert full - window == 4.0 * (128 - 8) * 2 * 1000 * 2
    config = ml_collections.ConfigDict({"name": "trace", "max_answer_len": 16})
    assert memory.answer_length(config) == 16
    assert memory.answer_length(ml_collections.ConfigDict({"name": "offline-trace", "max_answer_len": 2})) == 16, \
        "offline-trace widens answers to the longest task budget (reply: 16 new tokens)"
    assert memory.answer_length(ml_collections.ConfigDict({"name": "offline-text-cil"})) == 0


def test_the_vit_cifar100_plan_is_of_treeloras_hide_form_with_hides_class_statistics(tmp_path):
    """vit_b16_cifar100 runs TreeLoRA in HiDe's form, which keeps a covariance per class under the
    slots and one of the pre-trained features (100 classes x 768 x 768 float32 each, 0.22 GiB apiece).
    The planner must size that method, not TreeLoRA's LLM form (whose state is a few MiB)."""
    from transformers import ViTConfig

    from experiments.configs import vit_b16_cifar100

    ViTConfig().save_pretrained(str(tmp_path / "vit"))  # ViT-B/16: hidden 768, 12 layers; config.json only
    config = vit_b16_cifar100.get_config()
    config.model.path = str(tmp_path / "vit")
    planned = memory.plan_run(config, check=False)
    covariances = 2 * 100 * 768 * 768 * 4
    assert covariances <= planned.method_bytes < covariances + 0.05 * 2 ** 30, \
        f"method state {planned.method_bytes / 2 ** 30:.3f} GiB: HiDe's class covariances are {covariances / 2 ** 30:.3f}"
    config.method.treelora.form = "llm"
    assert memory.plan_run(config, check=False).method_bytes < 0.05 * 2 ** 30, "the LLM form keeps no class statistics"
