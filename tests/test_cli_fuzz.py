"""Property test: generated configs thrown at the command line never produce a traceback. Every
outcome is exit 0 (a valid config) or exit 2 with exactly one line on stderr, and every config that
is certainly bad (`certainly_bad`: an unknown key, a count below 1, a name outside its choices, a
value of the wrong type) gets exit 2. `run --dry_run` checks the config without loading weights or
data, so each example is fast."""
import ast

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from jaxtree_lora import cli  # noqa: E402

KEYS = ["seed", "method.name", "lora.rank", "lora.alpha", "lora.dropout", "lora.init", "lora.targets",
        "lora.max_modules", "optimizer.learning_rate", "optimizer.b1", "optimizer.clip_norm",
        "optimizer.schedule", "train.batch_size", "train.accumulation", "train.epochs", "train.head",
        "train.train_mask", "train.mesh", "train.max_tasks", "eval.batch_size", "eval.temperature",
        "eval.classifier", "method.treelora.lam", "method.treelora.selection", "method.treelora.tree_depth",
        "method.o_lora.penalty", "method.inflora.lamb", "method.lilora.sub_rank", "method.cl_lora.temperature",
        "model.compute_dtype", "data.num_tasks", "no.such.key", "lora.unknown"]

VALUES = st.one_of(
    st.integers(min_value=-10 ** 6, max_value=10 ** 6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "inf", "-1", "0", "1e-3", "true", "None", "[]", "[1,2]", "[0,0,0]", "abc",
                     "official", "seqlora", "treelora", "cosine", "bfloat16", "attn.query", "'x'", "{}"]),
    st.text(max_size=12),
)


COUNTS = ("train.batch_size", "train.accumulation", "eval.batch_size", "data.num_tasks")  # integers >= 1
CHOICES = {"model.compute_dtype": (None, "", "float32", "bfloat16"), "train.head": ("", "cosine", "linear"),
           "train.train_mask": ("task", "seen"), "eval.classifier": ("", "prototype", "head")}


def parsed(text):
    """The value an override's text stands for, written here apart from the config code: booleans and
    None by name, Python literals, anything else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(lowered)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def certainly_bad(overrides) -> str:
    """Why the overrides are bad input for certain ('' when this oracle cannot tell): judged on the last
    value given to each key, as the command line applies them in order."""
    from jaxtree_lora import methods

    if any(key in ("no.such.key", "lora.unknown") for key, _ in overrides):
        return "unknown key"
    final = {key: parsed(text) for key, text in overrides}
    for key in COUNTS:
        value = final.get(key, 1)
        if isinstance(value, (str, list, tuple, dict)) or (isinstance(value, (int, float)) and value < 1):
            return f"{key}={value!r}: a count must be an integer >= 1"
    for key, allowed in CHOICES.items():
        value = final.get(key, allowed[-1])
        if not isinstance(value, (str, type(None))) or value not in allowed:
            return f"{key}={value!r}: not one of {allowed}"
    if "method.name" in final and final["method.name"] not in methods.names():
        return f"method.name={final['method.name']!r}: no such method"
    temperature = final.get("eval.temperature", 0.0)
    if isinstance(temperature, (str, list, tuple, dict)) or (isinstance(temperature, (int, float)) and temperature < 0):
        return f"eval.temperature={temperature!r}: must be a number >= 0"
    return ""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_generated_overrides_never_give_a_traceback(overrides, capsys):
    argv = ["run", "--dry_run"] + [f"--config.{key}={value}" for key, value in overrides]
    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse rejecting an argument it cannot parse
        status = exit.code
    err = capsys.readouterr().err
    assert status in (0, 2), f"{argv}: exit {status}\n{err}"
    why = certainly_bad(overrides)
    if why:
        assert status == 2, f"{argv} is bad input ({why}) but was accepted"
    if status == 2:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, f"{argv}: not one clear line\n{err}"
