"""TreeLoRA's two forms and the name `treelora` that resolves to one of them (jaxtree_lora.assemble), and
the one inference rule each method declares (methods.base.InferenceRule, evaluation.evaluator.RULES)."""
import dataclasses

import pytest

from jaxtree_lora import config as config_lib, lora as lora_lib, methods
from jaxtree_lora.assemble import method_from_config
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.evaluation.evaluator import RULES, effective_rule
from jaxtree_lora.methods.base import InferenceRule, Method
from jaxtree_lora.methods.hide_lora import HiDeLoRA
from jaxtree_lora.methods.treelora_hide import TreeLoRAHiDe
from jaxtree_lora.methods.treelora_llm import TreeLoRALLM


def built(kind, *overrides, name="treelora"):
    config = config_lib.apply_overrides(config_lib.load(""), [f"method.name={name}", *overrides])
    return method_from_config(config, kind, max_tasks=3)


def test_treelora_trains_the_form_its_stream_kind_picks_or_the_one_form_names():
    assert type(built("classification")) is TreeLoRAHiDe, "classification streams: the HiDe form"
    assert type(built("instruction")) is TreeLoRALLM, "instruction streams: the LLM form"
    assert type(built(None)) is TreeLoRALLM, "a kind the config cannot tell: the LLM form"
    assert type(built("classification", "method.treelora.form=llm")) is TreeLoRALLM, "form=llm on any stream"
    assert type(built("instruction", "method.treelora.form=hide")) is TreeLoRAHiDe, "form=hide on any stream"
    assert built("classification").name == "treelora_hide" and built("instruction").name == "treelora_llm", \
        "the form's own name is the one results.json and the export record"


def test_each_form_has_its_own_lora_spec_and_tree_defaults():
    llm, hide = built("instruction"), built("classification")
    assert (llm.lora.targets, llm.lora.rank, llm.lora.alpha, llm.lora.dropout) == (("q", "v"), 8, 32.0, 0.1), \
        "the official LLM code's LoRA (q and v, r 8, alpha 32, dropout 0.1)"
    assert hide.lora == HiDeLoRA.lora, "the HiDe form trains HiDe-LoRA's slots (k, v of 5 blocks, r 4, alpha 1)"
    assert (llm.lam, llm.tree_depth) == (0.5, -1) and (hide.lam, hide.tree_depth) == (0.1, 5)
    assert (hide.tree.lam, hide.tree.tree_depth, hide.tree.lora) == (0.1, 5, hide.lora), \
        "the block tree runs on the form's own options and LoRA spec"


def test_treelora_options_reach_the_chosen_form_and_an_other_forms_option_is_refused():
    assert built("classification", "method.treelora.reg=0.5", "method.treelora.lam=0.3").reg == 0.5
    assert built("classification", "method.treelora.lam=0.3").tree.lam == 0.3
    assert built("instruction", "method.treelora.selection=random").selection == "random"
    with pytest.raises(ConfigError, match="reg is an option of treelora_hide only.*treelora_llm"):
        built("instruction", "method.treelora.reg=0.5")
    with pytest.raises(ConfigError, match="method.treelora.form must be"):
        built("classification", "method.treelora.form=both")


def test_the_forms_run_under_their_own_names_with_their_own_options():
    assert built("classification", "method.treelora_llm.lam=0.2", name="treelora_llm").lam == 0.2
    hide = built("instruction", "method.treelora_hide.tree_depth=3", name="treelora_hide")
    assert type(hide) is TreeLoRAHiDe and hide.tree.tree_depth == 3, "a form named runs on any stream"


def test_hide_lora_options_reach_the_hide_form_unless_treelora_sets_them():
    """HiDe-LoRA's options under config.method.hide_lora apply to TreeLoRA's HiDe form too (the configs
    that shorten HiDe's head trainers set them there); one set for treelora itself wins."""
    assert built("classification", "method.hide_lora.tap_epochs=2").tap_epochs == 2
    assert built("classification", "method.hide_lora.tap_epochs=2", "method.treelora.tap_epochs=3").tap_epochs == 3
    assert built("classification").tap_epochs == HiDeLoRA.tap_epochs, "nothing set: HiDe-LoRA's default"


def test_every_method_declares_one_rule_and_the_evaluator_has_a_function_for_each_rule():
    assert set(RULES) == set(InferenceRule), "a rule with no scoring function in the evaluator's table"
    for name in methods.names():
        cls = methods.get_class(name)
        if issubclass(cls, Method):
            assert isinstance(cls.inference_rule, InferenceRule), f"{name}: {cls.inference_rule!r}"
            if cls.inference_rule is InferenceRule.INFERRED_TASK_SLOT:
                assert cls.infer_task is not None, f"{name} infers each example's slot: it needs infer_task"
    expected = {"seqlora": "FINAL_ADAPTERS", "treelora_llm": "FINAL_ADAPTERS", "lilora": "GIVEN_TASK_SLOT",
                "hide_lora": "INFERRED_TASK_SLOT", "treelora_hide": "INFERRED_TASK_SLOT",
                "cl_lora": "PER_SLOT_SCORING", "fix": "PROTOTYPES"}
    assert {name: methods.get_class(name).inference_rule.name for name in expected} == expected


def test_task_identity_inferred_turns_only_a_given_slot_into_an_inferred_one():
    lilora, seqlora, hide = (methods.get_class(name) for name in ("lilora", "seqlora", "hide_lora"))
    assert effective_rule(lilora, "given") is InferenceRule.GIVEN_TASK_SLOT
    assert effective_rule(lilora, "inferred") is InferenceRule.INFERRED_TASK_SLOT
    assert effective_rule(seqlora, "inferred") is InferenceRule.FINAL_ADAPTERS, "no slot to infer"
    assert effective_rule(hide, "given") is InferenceRule.INFERRED_TASK_SLOT, "HiDe-LoRA always infers it"


def test_the_user_facing_name_declares_every_option_of_both_forms():
    options = {field.name for field in dataclasses.fields(methods.get_class("treelora"))}
    for form in (TreeLoRALLM, TreeLoRAHiDe):
        own = {field.name for field in dataclasses.fields(form)} - {"lora", "max_tasks", "folded"}
        assert own <= options, f"{form.__name__} options missing under config.method.treelora: {own - options}"
    assert "form" in options and not issubclass(methods.get_class("treelora"), Method), \
        "treelora only names options; a run trains one of its forms"
    assert isinstance(TreeLoRALLM.lora, lora_lib.LoraSpec)
