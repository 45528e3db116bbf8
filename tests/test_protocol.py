"""Each method under its own protocol: its own LoRA spec (keys the user sets on top), its own head and
inference rule, recorded in results.json; and the `fix` baseline (nothing trained, nearest class mean
of the pre-trained features)."""
import jax
import numpy as np
import pytest

from experiments.configs import default
from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.evaluation import prototypes as prototypes_lib
from jaxtree_lora.models.common import Site
from jaxtree_lora.train.loop import build_method, protocol_of

from test_loop import make_run, tiny_config

BERT_SITES = {"attn.query": Site(8, 8), "attn.key": Site(8, 8), "attn.value": Site(8, 8), "attn.output": Site(8, 8)}
LLAMA_SITES = {"attn.q_proj": Site(8, 8), "attn.k_proj": Site(8, 4), "attn.v_proj": Site(8, 4),
               "attn.o_proj": Site(8, 8)}


def config_for(method, **lora):
    config = default.get_config()
    config.method.name = method
    for key, value in lora.items():
        config.lora[key] = value
    return config


def test_inflora_trains_k_and_v_at_rank_10_unless_told_otherwise():
    method = build_method(config_for("inflora"), max_tasks=3)
    assert method.lora.rank == 10 and method.lora.dropout == 0.0, "InfLoRA's own spec: rank 10, no dropout"
    assert list(method.lora.select(BERT_SITES)) == ["attn.key", "attn.value"], "k and v under BERT's names"
    assert list(method.lora.select(LLAMA_SITES)) == ["attn.k_proj", "attn.v_proj"], "k and v under Llama's names"
    told = build_method(config_for("inflora", rank=4), max_tasks=3)
    assert told.lora.rank == 4, "a key the user sets replaces the method's value"
    assert list(told.lora.select(BERT_SITES)) == ["attn.key", "attn.value"], "and only that key"


def test_each_method_keeps_its_own_spec_by_default():
    sd = build_method(config_for("sd_lora"), max_tasks=3).lora
    assert (sd.rank, sd.dropout, sd.targets) == (10, 0.0, ("q", "v"))
    seq = build_method(config_for("seqlora"), max_tasks=3).lora
    assert (seq.rank, seq.alpha, seq.dropout) == (8, 32.0, 0.1), "the official TreeLoRA scripts' baseline spec"
    for name in ("cl_lora", "loda", "c_lora"):
        assert build_method(config_for(name), max_tasks=3).lora.dropout == 0.0, f"{name} runs without dropout"
    from jaxtree_lora import config as config_lib

    forced = build_method(config_lib.apply_overrides(config_for("sd_lora"), ["lora.targets=attn.query"]),
                          max_tasks=3).lora
    assert forced.targets == ("attn.query",), "a single target from the command line becomes a tuple"


def test_roles_name_the_same_projection_in_every_backbone():
    spec = lora_lib.LoraSpec(targets=("q", "o"))
    assert list(spec.select(BERT_SITES)) == ["attn.query", "attn.output"]
    assert list(spec.select(LLAMA_SITES)) == ["attn.q_proj", "attn.o_proj"]
    with pytest.raises(lora_lib.LoraSpecError, match="matches no site"):
        lora_lib.LoraSpec(targets=("k",)).select({"attn.query": Site(8, 8)})


def test_protocols_follow_the_official_code_unless_the_config_names_one():
    expected = {"inflora": ("linear", "head"), "sd_lora": ("linear", "head"), "seqlora": ("linear", "head"),
                "loda": ("cosine", "head"), "cl_lora": ("cosine", "prototype"), "fix": ("linear", "prototype")}
    for name, (head, classifier) in expected.items():
        config = config_for(name)
        got = protocol_of(config, build_method(config, max_tasks=2))
        assert (got["head"], got["classifier"]) == (head, classifier), name
    config = config_for("inflora")
    config.train.head, config.eval.classifier = "cosine", "prototype"
    got = protocol_of(config, build_method(config, max_tasks=2))
    assert (got["head"], got["classifier"]) == ("cosine", "prototype"), "the user's choice wins"


def test_unknown_lora_key_is_refused():
    config = config_for("seqlora")
    config.lora.unknown_key = 3
    with pytest.raises(ConfigError, match="no key"):
        build_method(config, max_tasks=2)


def test_fix_trains_nothing_and_scores_the_pretrained_nearest_class_mean(tmp_path):
    config = tiny_config("fix")
    run = make_run(config, tmp_path / "run")
    before = jax.device_get(run.initial_state().trainable)
    outcome = run.fit()
    state = outcome["state"]
    assert int(state.step) == 0, "fix runs no optimiser step"
    assert state.trainable["adapters"] == {} and np.array_equal(jax.device_get(state.trainable)["head"]["w"],
                                                                before["head"]["w"])
    # Independent check: nearest class mean of the pre-trained features, computed here by hand.
    features = jax.jit(lambda batch: run.backbone.features(run.frozen, batch))
    stream = run.stream
    means = np.zeros((stream.num_classes, run.backbone.info.feature_dim))
    for task in stream.tasks:
        f = np.asarray(features(dict(task.train.inputs)), np.float64)
        f /= np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6
        for c in task.classes:
            means[c] = f[task.train.labels == c].mean(0)
    last = len(stream.tasks) - 1
    for index, task in enumerate(stream.tasks):
        f = np.asarray(features(dict(task.test.inputs)), np.float64)
        seen = [c for t in stream.tasks[:last + 1] for c in t.classes]
        scores = prototypes_lib.nearest(f, means[seen], seen)
        expected = 100.0 * np.mean(scores == task.test.labels)
        assert outcome["matrix"][index, last] == pytest.approx(expected, abs=1e-6)
    assert np.allclose(outcome["matrix"], outcome["ncm_matrix"], equal_nan=True), "fix's protocol is the NCM"
    assert np.allclose(outcome["recomputed_prototype_scores"], outcome["matrix"][:, last]), \
        "features never change, so recomputing the prototypes changes nothing"


def test_fix_has_no_head_to_score_with(tmp_path):
    config = tiny_config("fix")
    config.eval.classifier = "head"
    with pytest.raises(ConfigError, match="trains nothing"):
        make_run(config, tmp_path / "run")


def test_results_record_the_protocol_used(tmp_path):
    from jaxtree_lora import cli

    config = tiny_config("inflora", epochs=1)
    config.lora.targets, config.lora.rank = None, None  # InfLoRA's own spec
    run = make_run(config, tmp_path / "run")
    protocol = cli.run_protocol(run)
    assert protocol["lora"]["rank"] == 10 and protocol["lora"]["targets"] == ("k", "v")
    assert (protocol["head"], protocol["classifier"], protocol["task_identity"]) == ("linear", "head", "free")
    line = cli.describe_protocol(protocol)
    assert "LoRA r 10" in line and "on k, v" in line and "head linear" in line
    # InfLoRA's code applies no alpha / r: the record says what multiplies B A x, not the spec's alpha.
    assert protocol["lora"]["scale"] == 1.0 and "scale 1, no alpha / r" in line, line


def test_an_explicit_lora_key_wins_in_treeloras_hide_form_even_at_the_llm_default(tmp_path):
    """`--config.lora.rank=8` with TreeLoRA on a classification stream (form "auto": HiDe's
    decomposition, whose own rank is 4): 8 is also the LLM form's default, and the run must still train
    at rank 8, as the protocol line says. Without the key it runs at HiDe's rank 4."""
    from jaxtree_lora import cli, config as config_lib

    for overrides, rank in ((["lora.rank=8"], 8), ([], 4)):
        config = config_lib.apply_overrides(default.get_config("tiny"), overrides)
        run = make_run(config, tmp_path / f"rank{rank}")
        assert run.method.name == "treelora_hide", "treelora on a classification stream: its HiDe form"
        line = cli.describe_protocol(cli.run_protocol(run))
        assert f"LoRA r {rank} on k, v" in line, f"{overrides}: {line}"
        adapters = run.initial_state().trainable["adapters"]
        ranks = {site: leaves["a"].shape[-2] for site, leaves in adapters.items()}  # a: [L, slots, r, d_in]
        assert set(ranks.values()) == {rank}, f"{overrides}: the adapters have ranks {ranks}"


@pytest.mark.parametrize("kind,unset_lam,unset_depth", [("classification", 0.1, 5), ("instruction", 0.5, -1)])
def test_a_treelora_option_set_explicitly_is_kept_in_either_form_whatever_its_value(kind, unset_lam, unset_depth):
    """An option the config sets keeps its value, also where that value is the other form's default (or
    its own); an option it leaves unset takes the form's own default (hide: TreeLoRA's ViT lam 0.1 and
    tree depth 5; llm: the official 0.5 and -1)."""
    from jaxtree_lora import config as config_lib
    from jaxtree_lora.assemble import method_from_config

    def tree_of(*overrides):
        config = config_lib.apply_overrides(default.get_config(), list(overrides))
        method = method_from_config(config, kind, max_tasks=3)
        return method.tree if kind == "classification" else method

    unset = tree_of()
    assert (unset.lam, unset.tree_depth) == (unset_lam, unset_depth), "unset: the form's own defaults"
    for lam in (0.5, 0.1, 0.3):  # the LLM default, the hide default, neither
        assert tree_of(f"method.treelora.lam={lam}").lam == lam, f"lam={lam} set explicitly"
    for depth in (-1, 5, 3):
        assert tree_of(f"method.treelora.tree_depth={depth}").tree_depth == depth, f"tree_depth={depth}"
    chosen = tree_of("method.treelora.lam=0.5", "method.treelora.selection=official", "lora.alpha=32")
    assert chosen.lam == 0.5 and chosen.selection == "official" and chosen.lora.alpha == 32.0, \
        "TreeLoRA's own defaults, set explicitly, are kept (alpha 32 against HiDe's 1 in the hide form)"
    assert tree_of("method.treelora.lam=None").lam == unset_lam, "None is unset: the form's default"


def test_the_optimiser_is_the_methods_own_unless_the_config_sets_one():
    """Each method trains with its official code's optimiser (HiDe-LoRA and TreeLoRA's HiDe form: Adam at
    0.03 x batch / 256; LoDA, CL-LoRA, SD-LoRA: SGD with momentum at their CIFAR-100 rates; InfLoRA: Adam
    5e-4), others with the official TreeLoRA Adam 1e-4; a name or rate the user sets applies to every
    method, whole: otherwise LoDA would run SGD at a rate chosen for Adam."""
    from jaxtree_lora.methods.treelora_hide import TreeLoRAHiDe
    from jaxtree_lora.train.loop import optimizer_for

    def resolved(config, method=None):
        return optimizer_for(config, method or build_method(config, 5))

    config = config_for("hide_lora")
    config.train.batch_size = 24
    assert resolved(config)["learning_rate"] == pytest.approx(0.03 * 24 / 256)
    assert resolved(config, TreeLoRAHiDe())["learning_rate"] == pytest.approx(0.03 * 24 / 256), "TreeLoRA's HiDe form"
    assert resolved(config)["name"] == "adam"
    expected = {"seqlora": ("adam", 1e-4, 0.0), "treelora": ("adam", 1e-4, 0.0), "inflora": ("adam", 5e-4, 0.0),
                "loda": ("sgd", 0.005, 5e-4), "cl_lora": ("sgd", 0.03, 1e-4), "sd_lora": ("sgd", 8e-3, 0.0)}
    for method, (name, rate, decay) in expected.items():
        config.method.name = method
        settings = resolved(config)
        assert (settings["name"], settings["learning_rate"], settings["weight_decay"]) == (name, rate, decay), method
    assert resolved(config)["momentum"] == 0.9 and resolved(config)["clip_norm"] == 0.0, "SD-LoRA's SGD"
    config.method.name = "seqlora"
    assert resolved(config)["clip_norm"] == 1.0 and resolved(config)["b2"] == 0.95, "the official TreeLoRA Adam"
    config.optimizer.learning_rate = 5e-4
    for method in ("hide_lora", "loda", "inflora"):
        config.method.name = method
        settings = resolved(config)
        assert (settings["name"], settings["learning_rate"], settings["clip_norm"]) == ("adam", 5e-4, 1.0), \
            f"the user's optimiser wins for {method}"
    config.optimizer.learning_rate = None
    config.optimizer.name = "sgd"
    assert resolved(config)["name"] == "sgd" and resolved(config)["learning_rate"] == 1e-4, "named: the config's"


def test_the_run_prints_and_records_its_learning_rate(tmp_path):
    from jaxtree_lora import cli

    config = tiny_config("seqlora", epochs=1)
    config.optimizer.learning_rate = None
    run = make_run(config, tmp_path / "run")
    protocol = cli.run_protocol(run)
    assert protocol["learning_rate"] == 1e-4 and "adam lr 0.0001" in cli.describe_protocol(protocol)
    assert protocol["optimizer"]["name"] == "adam" and protocol["optimizer"]["b2"] == 0.95
    config = tiny_config("loda", epochs=1)
    config.optimizer.learning_rate = None
    loda = cli.run_protocol(make_run(config, tmp_path / "loda"))
    assert "sgd lr 0.005 (momentum 0.9, wd 0.0005)" in cli.describe_protocol(loda), cli.describe_protocol(loda)
    assert cli.run_protocol(make_run(tiny_config("fix"), tmp_path / "fix"))["learning_rate"] is None, "fix trains nothing"


def test_fix_generates_each_tasks_answers_once_on_an_instruction_stream(tmp_path, monkeypatch):
    """`fix` trains nothing, so with greedy decoding a task's generated answers are the same after every
    task: each task is generated once (2 calls for 2 tasks, not 1 + 2) and its row is constant. A
    cache keyed wrongly would repeat the work, or give task 1 task 0's score."""
    from jaxtree_lora.data import get_stream
    from jaxtree_lora.evaluation import generation as generation_lib
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run
    from test_paper_configs import write_tiny_llama_and_trace

    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "C-STANCE"), train_rows=4)
    config = default.get_config()
    config.method.name = "fix"
    config.model.name, config.model.kind, config.model.path = "hf", "decoder", llama
    config.data = dict(name="trace", root=trace, tasks=["FOMC", "C-STANCE"], max_prompt_len=8, max_answer_len=2)
    config.eval.temperature = 0.0
    calls = []
    original = generation_lib.generate_and_score

    def counting(task, *args, **kwargs):
        calls.append(task.name)
        return original(task, *args, **kwargs)

    monkeypatch.setattr(generation_lib, "generate_and_score", counting)
    backbone = backbone_lib.build(config)
    run = Run(config=config, backbone=backbone, stream=get_stream(config.data, backbone.tokenizer),
              workdir=str(tmp_path / "run"), progress=False)
    outcome = run.fit()
    assert calls == ["FOMC", "C-STANCE"], calls
    matrix = outcome["matrix"]
    assert matrix[0, 0] == matrix[0, 1], "fix's score on a task cannot change while nothing trains"


def test_every_data_source_has_a_stream_kind_for_the_assembly():
    """A source missing from assemble.STREAM_KINDS is validated before its method's form is resolved
    (TreeLoRA's HiDe options went unchecked on offline-fashion-cil until its first task)."""
    from jaxtree_lora import assemble, data

    missing = [name for name in data.NAMES if name != "sequence" and name not in assemble.STREAM_KINDS]
    assert not missing, f"data sources with no stream kind in assemble.STREAM_KINDS: {missing}"
