"""Property test: generated configs thrown at the command line never produce a traceback. Every
outcome is exit 0 (a valid config) or exit 2 with one line on stderr. `run --dry_run` checks the
config without loading weights or data, so each example is fast."""
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
    if status == 2:
        assert "Traceback" not in err and err.strip(), f"{argv}: no clear message\n{err}"
