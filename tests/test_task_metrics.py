"""TRACE's task metrics on hand-computed cases and published values.

Independent references: the arithmetic written beside each case; HF's `sari` metric card examples; and,
when installed (not project dependencies), fuzzywuzzy and sacrebleu themselves.
"""
import random
import warnings

import pytest

from jaxtree_lora.evaluation import task_metrics as tm


# -- accuracy, first_char, exact_match ------------------------------------------------------------------
def test_accuracy_strips_and_truncates_the_prediction_to_the_target_length():
    predictions = ["positive!", " negative", "neg", "", "Positive"]
    targets = ["positive", "negative", "negative", "negative", "positive"]
    # hits: "positive!"[:8] == "positive"; " negative".strip(); misses: too short, empty, wrong case -> 2/5
    assert tm.accuracy(predictions, targets) == pytest.approx(40.0)


def test_accuracy_leaves_the_target_as_is_and_empty_sides_miss():
    assert tm.accuracy(["A"], [" A"]) == 0.0, "TRACE strips the prediction only, never the target"
    assert tm.accuracy(["x"], [""]) == 0.0 and tm.accuracy([""], [""]) == 0.0, "TRACE skips empty pairs (a miss)"


def test_first_char_compares_the_first_non_space_character():
    # "B) because" vs "B" hit; "A" vs "C" miss; "" miss; " C" vs "C\n..." hit -> 2/4
    assert tm.first_char(["B) because", "A", "", " C"], ["B", "C", "A", "C\nBecause ..."]) == 50.0


def test_exact_match_with_and_without_normalisation():
    predictions, targets = ["The  Cat\n", "dog"], ["the cat", "Dog!"]
    assert tm.exact_match(predictions, targets) == 50.0, "case and whitespace runs are ignored when normalising"
    assert tm.exact_match(predictions, targets, normalize=False) == 0.0


# -- ROUGE-L --------------------------------------------------------------------------------------------
def test_rouge_l_f_measure_by_hand():
    # prediction 6 tokens, target 5, LCS "the cat on the mat" = 5: P = 5/6, R = 5/5, F = 2PR/(P+R) = 10/11
    assert tm.rouge_l(["the cat sat on the mat"], ["the cat on the mat"]) == pytest.approx(1000 / 11)
    # an empty prediction scores 0 and still counts: (10/11 + 0) / 2
    assert tm.rouge_l(["the cat sat on the mat", ""], ["the cat on the mat", "x"]) == pytest.approx(500 / 11)
    assert tm.rouge_l(["The CAT sat."], ["the cat sat"]) == pytest.approx(100.0), \
        "rouge-score lower-cases and drops punctuation"


# -- fuzzy (Py150) --------------------------------------------------------------------------------------
def test_fuzzy_ratio_by_hand_for_both_matchers():
    # "abcd" / "abce": 3 matching characters of 8 -> 2 * 3 / 8 = 75 for both matchers
    assert tm.fuzzy_ratio("abcd", "abce") == 75 and tm.fuzzy_ratio("abcd", "abce", "levenshtein") == 75
    # "abca" / "ba": difflib takes the first longest block ("a" at 0 / "a" at 1) and nothing fits around it:
    # 1 match -> 2/6 -> 33. Indel counts the LCS "ba" (2): 1 - (6 - 4) / 6 = 4/6 -> 67.
    assert tm.fuzzy_ratio("abca", "ba", "difflib") == 33
    assert tm.fuzzy_ratio("abca", "ba", "levenshtein") == 67
    # "abc" / "abd": 2 * 2 / 6 = 66.7 -> fuzzywuzzy rounds to 67
    assert tm.fuzzy_ratio("abc", "abd") == 67
    with pytest.raises(ValueError, match="difflib, levenshtein"):
        tm.fuzzy_ratio("a", "b", "jaro")


def test_fuzzy_averages_and_scores_empty_pairs_zero():
    # (33 + 100 + 0) / 3: equal strings give 100, an empty prediction 0 (TRACE skips it, keeps the count)
    assert tm.fuzzy(["abca", "x", ""], ["ba", "x", "y"]) == pytest.approx(133 / 3)
    assert tm.fuzzy([""], [""]) == 0.0


def test_fuzzy_applies_tracess_py150_literal_postprocessing():
    assert tm.py150_postprocess("x = <NUM_LIT> + <STR_LIT:hello> + '<STR_LIT>' + <CHAR_LIT:c>") == "x = 0 + hello + '' + c"
    assert tm.fuzzy(["return 0"], ["return <NUM_LIT>"]) == 100.0
    assert tm.fuzzy(["return 0"], ["return <NUM_LIT>"], postprocess=False) < 100.0


def test_fuzzy_matches_fuzzywuzzy_when_installed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuzzywuzzy warns when python-Levenshtein is absent
        fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    matcher = "difflib" if fuzz.SequenceMatcher.__module__ == "difflib" else "levenshtein"
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("abc de(f)_\n") for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice("abc de(f)_\n") for _ in range(rng.randint(0, 40)))
        assert tm.fuzzy_ratio(a, b, matcher) == fuzz.ratio(a, b), (a, b, matcher)


# -- SARI (20Minuten) -----------------------------------------------------------------------------------
HF_SOURCE = "About 95 species are currently accepted."
HF_REFERENCES = ["About 95 species are currently known.", "About 95 species are now accepted.",
                 "95 species are now accepted."]


def test_sari_matches_the_hf_metric_card_examples():
    assert tm.sari(["About 95 you now get in."], [HF_REFERENCES], [HF_SOURCE]) == pytest.approx(26.953601953601954,
                                                                                               abs=1e-9)
    same = "About 95 species are currently accepted ."
    assert tm.sari([same], [[same]], [same]) == pytest.approx(100.0), "a prediction equal to source and reference"


def test_sari_by_hand():
    # source "a b c", prediction "a d", reference "a c e" (one reference, so counts are not scaled)
    # 1-grams: keep: kept {a}, good {a}, keepable {a, c}: P = 1, R = 1/2 -> F = 2/3
    #          delete: deleted {b, c}, good {b} (c is in the reference): P = (1 + 0) / 2 = 1/2
    #          add: added {d}, none in the reference: P = 0 -> F = 0
    # 2-grams: keep: nothing kept or keepable -> 0/0 = 1, F = 1; delete: {ab, bc} both good -> 1;
    #          add: {ad} not in the reference -> F = 0
    # 3-grams: keep 1; delete {abc} good -> 1; add: nothing added (P = 1), {ace} missed (R = 0) -> F = 0
    # 4-grams: nothing anywhere -> 1, 1, 1
    # keep = (2/3 + 3) / 4 = 11/12; delete = (1/2 + 3) / 4 = 7/8; add = (0 + 0 + 0 + 1) / 4 = 1/4
    # SARI = (11/12 + 7/8 + 1/4) / 3 = 49/72
    assert tm.sari_sentence("a b c", "a d", ["a c e"]) == pytest.approx(100 * 49 / 72)


def test_sari_of_an_empty_prediction_counts_one_empty_token_like_hf():
    # tokens: source [a, b], prediction [""] (HF splits "" on " "), reference [a]
    # 1-grams: keep: nothing kept (P = 1), keepable {a} missed (R = 0) -> F = 0;
    #          delete {a, b}, good {b} -> P = 1/2; add: {""} not in the reference -> P = 0, R = 1 (0/0) -> F = 0
    # 2-4-grams: the prediction and the reference have none; deleting "a b" is good -> all 1
    # keep = 3/4, delete = (1/2 + 3) / 4 = 7/8, add = 3/4 -> (3/4 + 7/8 + 3/4) / 3 = 19/24
    assert tm.sari_sentence("a b", "", ["a"]) == pytest.approx(100 * 19 / 24)


def test_sari_averages_sentences_and_scales_counts_by_references():
    one = tm.sari_sentence("a b c", "a d", ["a c e"])
    two = tm.sari_sentence(HF_SOURCE, "About 95 you now get in.", HF_REFERENCES)
    assert tm.sari(["a d", "About 95 you now get in."], ["a c e", HF_REFERENCES], ["a b c", HF_SOURCE]) \
        == pytest.approx((one + two) / 2)
    with pytest.raises(ValueError, match="sources="):
        tm.sari(["a"], ["a"], None)


def test_tokenize_13a_by_hand():
    assert tm.tokenize_13a("Hello, world.") == "Hello , world ."
    assert tm.tokenize_13a("3.5 and 1,000 (x-y) 3-4!") == "3.5 and 1,000 ( x-y ) 3 - 4 !"
    assert tm.tokenize_13a("&quot;a&quot;\nb") == '" a " b'


def test_tokenize_13a_matches_sacrebleu_when_installed():
    tokenizer_module = pytest.importorskip("sacrebleu.tokenizers.tokenizer_13a")
    tokenizer = tokenizer_module.Tokenizer13a()
    rng = random.Random(0)
    pieces = "the a , . 3.5 1,000 - x-y 3-4 ( ) ! ? Über &amp; &quot; <skipped> \n \t 'q' $5".split(" ")
    for _ in range(500):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert tm.tokenize_13a(text) == tokenizer(text), text


# -- dispatcher ----------------------------------------------------------------------------------------
def test_score_dispatches_and_rejects_unknown_names_and_bad_input():
    assert tm.score("accuracy", ["yes"], ["yes"]) == 100.0
    assert tm.score("sari", ["a d"], ["a c e"], sources=["a b c"]) == pytest.approx(100 * 49 / 72)
    assert tm.score("fuzzy", ["abca"], ["ba"]) == 33.0, "Py150 uses the difflib matcher by default"
    with pytest.raises(ValueError, match="choose one of accuracy, first_char, exact_match, rouge_l, fuzzy, sari"):
        tm.score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        tm.score("accuracy", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="test split is empty"):
        tm.score("rouge_l", [], [])
