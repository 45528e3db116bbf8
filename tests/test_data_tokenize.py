"""Tokenising: right-padded classification inputs; TRACE-style left-padded instruction arrays whose loss
covers the answer (and EOS) only. Expected ids are written out by hand from hand-made vocabularies."""
import numpy as np
import pytest

from jaxtree_lora.data.stream import DataError, Split, Task
from jaxtree_lora.data.tokenize import (CHATML, format_prompt, pad_to_common_length, tokenize_classification,
                                        tokenize_instruction)

WORDS = ["<pad>", "</s>", "<unk>", "is", "it", "good", "yes", "no", "answer", "<|im_start|>", "<|im_end|>",
         "user", "assistant", "<s>", "Q", "A", ":"]
ID = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(bos=False):
    """A real PreTrainedTokenizerFast over a word-level vocabulary (ids = positions in WORDS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"])
    if bos:  # Llama-style: the tokenizer itself puts <s> before every text
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ID["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>",
                                   bos_token="<s>")


def ids(*words):
    return [ID[w] for w in words]


def test_instruction_arrays_are_left_padded_with_loss_on_the_answer_and_eos_only():
    out = tokenize_instruction(["is it good answer"], ["yes"], word_tokenizer(), max_prompt_len=6, max_answer_len=3)
    pad = ID["<pad>"]
    # prompt (4) + answer "yes" + eos = 6 tokens, left-padded to 6 + 3
    assert out["input_ids"][0].tolist() == [pad] * 3 + ids("is", "it", "good", "answer", "yes", "</s>")
    assert out["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert out["loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1], "loss on answer tokens and EOS only"
    assert out["prompt_ids"][0].tolist() == [pad, pad] + ids("is", "it", "good", "answer")
    assert out["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    assert all(a.dtype == np.int32 for a in out.values())


def test_long_prompts_lose_their_beginning_and_long_answers_their_end():
    out = tokenize_instruction(["is it good answer is it"], ["yes no yes"], word_tokenizer(), max_prompt_len=3,
                               max_answer_len=2)
    assert out["input_ids"][0].tolist() == ids("answer", "is", "it", "yes", "no"), \
        "prompt left-truncated (TRACE), answer right-truncated (EOS dropped when it does not fit)"
    assert out["loss_mask"][0].tolist() == [0, 0, 0, 1, 1]
    assert out["prompt_ids"][0].tolist() == ids("answer", "is", "it")


def test_chat_formatting_wraps_the_prompt_as_a_user_turn():
    tokenizer = word_tokenizer()
    assert not getattr(tokenizer, "chat_template", None)
    assert format_prompt("is it good", tokenizer, True) == CHATML.format(prompt="is it good")
    out = tokenize_instruction(["is it good"], ["no"], tokenizer, max_prompt_len=8, max_answer_len=2,
                               chat_template=True)
    assert out["prompt_ids"][0].tolist() == ids("<|im_start|>", "user", "is", "it", "good", "<|im_end|>",
                                                "<|im_start|>", "assistant")
    assert out["input_ids"][0, -2:].tolist() == ids("no", "</s>") and out["loss_mask"][0].sum() == 2
    tokenizer.chat_template = ("{% for m in messages %}Q : {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}A :{% endif %}")
    assert format_prompt("is it", tokenizer, True) == "Q : is it A :", "the tokenizer's own template wins"
    assert format_prompt("is it", tokenizer, False) == "is it"


def test_plain_prompts_get_the_tokenizers_bos_but_chat_prompts_do_not():
    tokenizer = word_tokenizer(bos=True)
    plain = tokenize_instruction(["is it"], ["yes"], tokenizer, max_prompt_len=4, max_answer_len=2)
    assert plain["prompt_ids"][0].tolist() == ids("<pad>", "<s>", "is", "it"), "TRACE's tokenizer call adds BOS"
    assert plain["input_ids"][0, -2:].tolist() == ids("yes", "</s>"), "no BOS inside the answer"
    chat = tokenize_instruction(["is it"], ["yes"], tokenizer, max_prompt_len=8, max_answer_len=2,
                                chat_template=True)
    assert ID["<s>"] not in chat["prompt_ids"][0].tolist(), "a chat template spells its own BOS, if any"


def test_instruction_input_errors():
    with pytest.raises(DataError, match="every prompt needs one answer"):
        tokenize_instruction(["is"], [], word_tokenizer(), 4, 2)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>")),
                                     unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(DataError, match="eos"):
        tokenize_instruction(["is"], ["yes"], no_eos, 4, 2)


def test_classification_inputs_are_right_padded_and_truncated():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "again"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})  # lower-cases, like MiniLM's
    out = tokenize_classification(["Hello world", "hello world again again again"], tokenizer, max_len=6)
    assert out["input_ids"].tolist() == [[2, 5, 6, 3, 0, 0], [2, 5, 6, 7, 7, 3]], \
        "[CLS] text [SEP], right-padded; a long text is cut before [SEP]"
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert out["input_ids"].dtype == np.int32


def test_pad_to_common_length_left_pads_shorter_tasks():
    tokenizer = word_tokenizer()

    def task(index, answer_len):
        arrays = tokenize_instruction(["is it"], ["yes"], tokenizer, 3, answer_len)
        return Task(index, f"t{index}", Split(prompts=["is it"], answers=["yes"], arrays=arrays),
                    Split(prompts=["is it"], answers=["yes"], arrays=dict(arrays)))

    tasks = [task(0, 2), task(1, 5)]
    short_before = tasks[0].train.arrays["input_ids"].copy()
    pad_to_common_length(tasks, pad_id=ID["<pad>"])
    widths = {split.arrays[k].shape[1] for t in tasks for split in (t.train, t.test)
              for k in ("input_ids", "attention_mask", "loss_mask")}
    assert widths == {8}, "one sequence length for every task (one compiled step)"
    padded = tasks[0].train.arrays
    assert padded["input_ids"][0, 3:].tolist() == short_before[0].tolist()
    assert padded["attention_mask"][0, :3].sum() == 0 and padded["loss_mask"][0, :3].sum() == 0
    assert tasks[0].train.arrays["prompt_ids"].shape == (1, 3), "prompt arrays keep max_prompt_len"


@pytest.mark.assets
def test_answer_only_loss_mask_with_the_real_smollm2_tokenizer():
    """The tokens under the loss are exactly the answer and <|im_end|>; the prompt is the chat-formatted text."""
    assets = pytest.importorskip("jaxtree_lora.assets")
    gguf_lib = pytest.importorskip("gguf")
    try:
        path = assets.path("smollm2")
    except assets.AssetMissing:
        pytest.skip("asset smollm2 not installed (jaxtree-lora assets smollm2)")
    from jaxtree_lora.models.gguf import tokenizer_from_metadata

    tokenizer = tokenizer_from_metadata(gguf_lib.GGUFReader(str(path)))
    prompt = "Is this movie review positive or negative?\nReview: A delight.\nAnswer:"
    out = tokenize_instruction([prompt], ["positive"], tokenizer, max_prompt_len=96, max_answer_len=8,
                               chat_template=True)
    answer = out["input_ids"][0][out["loss_mask"][0] == 1]
    assert tokenizer.decode(answer) == "positive<|im_end|>"
    shown = tokenizer.decode(out["prompt_ids"][0][out["prompt_mask"][0] == 1])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    assert shown == expected and shown.endswith("<|im_start|>assistant\n")
    full = out["input_ids"][0][out["attention_mask"][0] == 1]
    assert tokenizer.decode(full) == expected + "positive<|im_end|>"


@pytest.mark.assets
def test_minilm_tokenizer_gives_the_bert_uncased_ids():
    assets = pytest.importorskip("jaxtree_lora.assets")
    try:
        folder = assets.path("minilm")
    except assets.AssetMissing:
        pytest.skip("asset minilm not installed (jaxtree-lora assets minilm)")
    from transformers import AutoTokenizer

    out = tokenize_classification(["Hello world"], AutoTokenizer.from_pretrained(str(folder)), max_len=6)
    # bert-base-uncased vocabulary: [CLS]=101, hello=7592, world=2088, [SEP]=102, [PAD]=0
    assert out["input_ids"].tolist() == [[101, 7592, 2088, 102, 0, 0]]
