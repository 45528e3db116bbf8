"""TRACE's task metrics, each a score in 0..100 averaged over examples.

- accuracy: TRACE's `metrics.py` rule: the stripped prediction, truncated to the target's length,
  must equal the stripped target.
- first_char: ScienceQA; the first non-space character of prediction and target agree.
- exact_match: whole strings equal after stripping (and, with `normalize`, lower-casing and
  collapsing whitespace).
- rouge_l: ROUGE-L F-measure from the `rouge-score` package (MeetingBank).
- fuzzy: Py150; fuzzywuzzy's `fuzz.ratio` (difflib-free Levenshtein ratio in python-Levenshtein)
  as computed by rapidfuzz's `fuzz.ratio`, which implements the same normalised Indel similarity.
- sari: 20Minuten; SARI (Xu et al., TACL 2016) with n-grams 1..4, averaging add-F1, keep-F1 and
  deletion precision, with EASSE's fix of the keep recall, as in HF evaluate's `sari` (the
  implementation TRACE's evaluation imports); text is lower-cased and split with sacrebleu's 13a rules.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

METRICS = ("accuracy", "first_char", "exact_match", "rouge_l", "fuzzy", "sari")


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    hits = 0
    for prediction, target in zip(predictions, targets):
        target = target.strip()
        hits += prediction.strip()[: len(target)] == target
    return 100.0 * hits / max(len(targets), 1)


def first_char(predictions, targets) -> float:
    hits = 0
    for prediction, target in zip(predictions, targets):
        p, t = prediction.strip(), target.strip()
        hits += bool(p) and bool(t) and p[0] == t[0]
    return 100.0 * hits / max(len(targets), 1)


def exact_match(predictions, targets, normalize: bool = True) -> float:
    def norm(text):
        return " ".join(text.lower().split()) if normalize else text.strip()

    return 100.0 * sum(norm(p) == norm(t) for p, t in zip(predictions, targets)) / max(len(targets), 1)


def rouge_l(predictions, targets) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(t, p)["rougeL"].fmeasure for p, t in zip(predictions, targets)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def fuzzy(predictions, targets) -> float:
    from rapidfuzz import fuzz

    return sum(fuzz.ratio(p, t) for p, t in zip(predictions, targets)) / max(len(targets), 1)


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _sari_ngram(source, prediction, references, n):
    """Add-F1, keep-F1 and deletion precision for one n-gram order (Xu et al. 2016, Eqs. 3-5)."""
    num_refs = len(references)
    s = _ngrams(source, n)
    c = _ngrams(prediction, n)
    r_all = Counter()
    for reference in references:
        r_all.update(_ngrams(reference, n))
    s_rep = Counter({g: count * num_refs for g, count in s.items()})
    c_rep = Counter({g: count * num_refs for g, count in c.items()})
    # keep
    keep_c = s_rep & c_rep
    keep_good = keep_c & r_all
    keep_all = s_rep & r_all
    keep_p = sum((keep_good[g] / keep_c[g]) for g in keep_c) / len(keep_c) if keep_c else 1.0
    # Keep recall with the fix EASSE and HF's `sari` apply to Xu et al.'s code: kept good n-gram
    # counts over all counts of source n-grams found in the references.
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    keep_f = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0
    # delete (precision only)
    del_c = s_rep - c_rep
    del_good = del_c - r_all
    del_p = sum((del_good[g] / del_c[g]) for g in del_c) / len(del_c) if del_c else 1.0
    # add
    add_c = set(c) - set(s)
    add_good = add_c & set(r_all)
    add_all = set(r_all) - set(s)
    add_p = len(add_good) / len(add_c) if add_c else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep_f, del_p, add_f


def tokenize_13a(text: str) -> list[str]:
    """Lower-cased tokens split as sacrebleu's 13a tokenizer splits them (punctuation apart)."""
    import re

    line = f" {text.lower()} "
    line = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", line)
    line = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", line)
    line = re.sub(r"([\.,])([^0-9])", r" \1 \2", line)
    line = re.sub(r"([0-9])(-)", r"\1 \2 ", line)
    return line.split()


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    source_tokens, prediction_tokens = tokenize_13a(source), tokenize_13a(prediction)
    reference_tokens = [tokenize_13a(r) for r in references]
    keeps, deletes, adds = [], [], []
    for n in range(1, 5):
        k, d, a = _sari_ngram(source_tokens, prediction_tokens, reference_tokens, n)
        keeps.append(k)
        deletes.append(d)
        adds.append(a)
    return 100.0 * (sum(keeps) / 4 + sum(deletes) / 4 + sum(adds) / 4) / 3


def sari(predictions, targets, sources) -> float:
    if sources is None:
        raise ValueError("sari needs the source texts")
    values = [sari_sentence(s, p, [t] if isinstance(t, str) else list(t))
              for s, p, t in zip(sources, predictions, targets)]
    return sum(values) / max(len(values), 1)


def score(metric: str, predictions: Sequence[str], targets: Sequence[str],
          sources: Optional[Sequence[str]] = None) -> float:
    if metric == "accuracy":
        return accuracy(predictions, targets)
    if metric == "first_char":
        return first_char(predictions, targets)
    if metric == "exact_match":
        return exact_match(predictions, targets)
    if metric == "rouge_l":
        return rouge_l(predictions, targets)
    if metric == "fuzzy":
        return fuzzy(predictions, targets)
    if metric == "sari":
        return sari(predictions, targets, sources)
    raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
