"""The PEFT comparison benchmark without its extra: one line naming the fix and exit status 2."""
import sys

import pytest

from experiments.benchmarks import versus_peft


def test_missing_torch_or_peft_exits_2_with_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        versus_peft.main(["--rows", "minilm"])
    assert exit_info.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install -e '.[bench]'" in out[0]


def test_unknown_row_exits_2_naming_the_rows(capsys):
    with pytest.raises(SystemExit) as exit_info:
        versus_peft.main(["--rows", "resnet"])
    assert exit_info.value.code == 2 and "minilm, smollm2, epoch" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dinov2_row_copies_the_asset_into_torch_and_times_both(dtype):
    """The paper's setting (a pre-trained ViT, HiDe-LoRA's spec) against PEFT: the torch model's [CLS]
    features equal ours on the batch (the row raises otherwise; bf16 compute within 5% of their scale),
    and both steps are timed, in float32 or both in bf16 mixed precision."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    args = versus_peft.argparse.Namespace(threads=2, warmup=1, steps=1, dtype=dtype, remat=dtype == "bfloat16")
    result = versus_peft.row_dinov2(args)
    if dtype == "float32":
        assert result["copied_weights_max_feature_difference"] < 1e-3
    assert result["ours_step_s"] > 0 and result["peft_step_s"] > 0 and result["tokens"] == 37
