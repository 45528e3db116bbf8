"""TRACE's task metrics: each returns a score in 0..100, averaged over examples.

Checked against the evaluation code the official TreeLoRA repository ships (ZinYY/TreeLoRA
`metrics.py`, `evaluations/eval_*.py`, a fork of BeyonderXX/TRACE's) and its pinned requirements:
accuracy (C-STANCE, FOMC, NumGLUE-cm/ds), first_char (ScienceQA), exact_match, rouge_l
(MeetingBank), fuzzy (Py150; `matcher="difflib"` reproduces TreeLoRA's fuzzywuzzy without
python-Levenshtein, "levenshtein" the sped-up variant) and sari (20Minuten, as HF `datasets`
computes it). Each metric's exact rules and where they differ from TRACE: docs/METRICS.md.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Optional, Sequence, Union

METRICS = ("accuracy", "first_char", "exact_match", "rouge_l", "fuzzy", "sari")
FUZZY_MATCHERS = ("difflib", "levenshtein")


def _check_pairs(predictions: Sequence[str], targets: Sequence, name: str) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{name}: one prediction per target is needed, got {len(predictions)} predictions "
                         f"for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError(f"{name}: nothing to score (no predictions): the task's test split is empty")


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Percent of examples whose stripped prediction, cut to len(target), equals the target."""
    _check_pairs(predictions, targets, "accuracy")
    hits = 0
    for prediction, target in zip(predictions, targets):
        cut = str(prediction).strip()[: len(target)]
        hits += bool(cut) and bool(target) and cut == target
    return 100.0 * hits / len(targets)


def first_char(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Percent of examples whose stripped prediction starts with the stripped target's first character."""
    _check_pairs(predictions, targets, "first_char")
    hits = 0
    for prediction, target in zip(predictions, targets):
        p, t = str(prediction).strip(), str(target).strip()
        hits += bool(p) and bool(t) and p[0] == t[0]
    return 100.0 * hits / len(targets)


def _normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split())


def exact_match(predictions: Sequence[str], targets: Sequence[str], normalize: bool = True) -> float:
    """Percent of whole-string matches; `normalize` lower-cases and collapses whitespace, else strips only."""
    _check_pairs(predictions, targets, "exact_match")
    norm = _normalize_text if normalize else (lambda text: str(text).strip())
    return 100.0 * sum(norm(p) == norm(t) for p, t in zip(predictions, targets)) / len(targets)


def rouge_l(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (x100) of each prediction against its target (`rouge-score`)."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, targets, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for prediction, target in zip(predictions, targets):
        if prediction and target:
            total += scorer.score(target, prediction)["rougeL"].fmeasure
    return 100.0 * total / len(targets)


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_postprocess(code: str) -> str:
    """TRACE's Py150 clean-up: bare literal placeholders become 0 / "" and `<KIND_LIT:x>` becomes x."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda match: match.group(2), code)


def fuzzy_ratio(prediction: str, target: str, matcher: str = "difflib") -> int:
    """fuzzywuzzy's `fuzz.ratio` of one pair: an integer 0..100 (100 for equal strings, 0 if one is empty)."""
    if matcher not in FUZZY_MATCHERS:
        raise ValueError(f"unknown fuzzy matcher {matcher!r}: choose one of {', '.join(FUZZY_MATCHERS)}")
    if prediction == target:
        return 100
    if not prediction or not target:
        return 0
    if matcher == "difflib":
        value = 100.0 * difflib.SequenceMatcher(None, prediction, target).ratio()
    else:
        from rapidfuzz import fuzz

        value = fuzz.ratio(prediction, target)
    return int(round(value))


def fuzzy(predictions: Sequence[str], targets: Sequence[str], matcher: str = "difflib",
          postprocess: bool = True) -> float:
    """Mean fuzzywuzzy ratio over examples (TRACE's Py150 "similarity"); an empty side scores 0."""
    _check_pairs(predictions, targets, "fuzzy")
    total = 0
    for prediction, target in zip(predictions, targets):
        if postprocess:
            prediction, target = py150_postprocess(prediction), py150_postprocess(target)
        if prediction and target:
            total += fuzzy_ratio(prediction, target, matcher)
    return total / len(targets)


# sacrebleu's 13a ("mteval-v13a") tokenizer, the regular-expression part.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and punctuation apart
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period / comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period / comma unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def tokenize_13a(text: str) -> str:
    """`text` as sacrebleu's 13a tokenizer returns it: tokens joined by single spaces."""
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _sari_tokens(text: str) -> list[str]:
    # Split on single spaces, not str.split(): an empty text is one empty token, as in HF's metric.
    return tokenize_13a(text.lower()).split(" ")


def _ngrams(tokens: Sequence[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def sari_ngram(source: Sequence[str], prediction: Sequence[str], references: Sequence[Sequence[str]],
               order: int) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) of one n-gram order, each in 0..1.

    Counts of source and prediction n-grams are multiplied by the number of references, so that they
    compare with the summed reference counts (Xu et al. 2016, Sec. 4.1).
    """
    num_references = len(references)
    source_counts = _ngrams(source, order)
    prediction_counts = _ngrams(prediction, order)
    reference_counts = Counter()
    for reference in references:
        reference_counts.update(_ngrams(reference, order))
    source_scaled = Counter({g: c * num_references for g, c in source_counts.items()})
    prediction_scaled = Counter({g: c * num_references for g, c in prediction_counts.items()})

    kept = source_scaled & prediction_scaled
    kept_good = kept & reference_counts
    keepable = source_scaled & reference_counts
    keep_precision = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_recall = sum(kept_good.values()) / sum(keepable.values()) if keepable else 1.0

    deleted = source_scaled - prediction_scaled
    deleted_good = deleted - reference_counts
    delete_precision = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(prediction_counts) - set(source_counts)
    added_good = added & set(reference_counts)
    addable = set(reference_counts) - set(source_counts)
    add_precision = len(added_good) / len(added) if added else 1.0
    add_recall = len(added_good) / len(addable) if addable else 1.0
    return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (0..100) of one prediction given its source and references (n-gram orders 1-4)."""
    if not references:
        raise ValueError("sari needs at least one reference per example")
    source_tokens, prediction_tokens = _sari_tokens(source), _sari_tokens(prediction)
    reference_tokens = [_sari_tokens(reference) for reference in references]
    keep, delete, add = 0.0, 0.0, 0.0
    for order in range(1, 5):
        k, d, a = sari_ngram(source_tokens, prediction_tokens, reference_tokens, order)
        keep, delete, add = keep + k, delete + d, add + a
    return 100.0 * (keep / 4 + delete / 4 + add / 4) / 3


def sari(predictions: Sequence[str], targets: Sequence[Union[str, Sequence[str]]],
         sources: Optional[Sequence[str]]) -> float:
    """Mean SARI over examples. A target is one reference string or a list of references."""
    if sources is None:
        raise ValueError("sari needs the source texts: pass sources= (TRACE uses the prompts)")
    _check_pairs(predictions, targets, "sari")
    if len(sources) != len(predictions):
        raise ValueError(f"sari: one source per prediction is needed, got {len(sources)} sources for "
                         f"{len(predictions)} predictions")
    values = [sari_sentence(s, p, [t] if isinstance(t, str) else list(t))
              for s, p, t in zip(sources, predictions, targets)]
    return sum(values) / len(values)


def score(metric_name: str, predictions: Sequence[str], targets: Sequence,
          sources: Optional[Sequence[str]] = None) -> float:
    """Dispatches to the metric named `metric_name` (one of METRICS); a score in 0..100."""
    if metric_name == "accuracy":
        return accuracy(predictions, targets)
    if metric_name == "first_char":
        return first_char(predictions, targets)
    if metric_name == "exact_match":
        return exact_match(predictions, targets)
    if metric_name == "rouge_l":
        return rouge_l(predictions, targets)
    if metric_name == "fuzzy":
        return fuzzy(predictions, targets)
    if metric_name == "sari":
        return sari(predictions, targets, sources)
    raise ValueError(f"unknown metric {metric_name!r}: choose one of {', '.join(METRICS)}")
