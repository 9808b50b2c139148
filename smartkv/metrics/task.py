"""Task scores in [0, 1]: LongBench v1's metrics and scoring rule, RULER's string matching, passkey's number match.

Sources: THUDM/LongBench `metrics.py` and `eval.py` (normalisation, F1, ROUGE-L via the `rouge` package,
classification, retrieval, count, code similarity via fuzzywuzzy); NVIDIA/RULER `scripts/eval/synthetic/constants.py`
(string_match_all / string_match_part); passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention").

`score(metric, prediction, answers, all_classes)` is the one entry point. A metric name may end in "@first_line":
LongBench scores only the first line of the prediction for trec, triviaqa, samsum and lsht
(`prediction.lstrip("\\n").split("\\n")[0]`). LongBench reports 100 * mean; these functions return the mean's terms.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from smartkv.metrics.textsim import EmptyTextError, fuzz_ratio, jieba_cut, rouge_l_f
from smartkv.core.registry import Registry

METRICS: Registry[Callable[..., float]] = Registry("metric")
FIRST_LINE = "@first_line"
# LongBench's Chinese punctuation list, verbatim (metrics.py, normalize_zh_answer).
ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—"
                  "‘’‛“”„‟…‧﹏.")
_PUNCT = set(string.punctuation)
_PUNCT_ZH = set(string.punctuation + ZH_PUNCTUATION)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, replace the articles a/an/the by a space, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _PUNCT_ZH).split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-bag F1 (SQuAD style)."""
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(prediction), num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


@METRICS.register("qa_f1_score")
def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


@METRICS.register("qa_f1_zh_score")
def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    def tokens(text):
        return [t for t in (normalize_zh_answer(w) for w in jieba_cut(text)) if t]
    return f1_score(tokens(prediction), tokens(ground_truth))


@METRICS.register("rouge_score")
def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    try:
        return rouge_l_f(prediction, ground_truth)
    except EmptyTextError:  # LongBench: any exception of `rouge` scores 0
        return 0.0


@METRICS.register("rouge_zh_score")
def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return rouge_score(" ".join(jieba_cut(prediction)), " ".join(jieba_cut(ground_truth)))


@METRICS.register("classification_score")
def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_) -> float:
    """1/len(matches) if the true class is among the class names found in the prediction.

    Class names that are a proper substring of the true class are dropped, removing while iterating as LongBench
    does (so of two consecutive such names the second stays). LongBench's difflib fallback is unreachable
    (`if em_match_list != 0` is always true) and is left out, as lm-eval and kvpress do.
    """
    matches = [c for c in all_classes if c in prediction]
    for term in matches:  # mutating while iterating is LongBench's behaviour, kept on purpose
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(target) for n in numbers) / len(numbers) if numbers else 0.0


@METRICS.register("retrieval_score")
def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


@METRICS.register("retrieval_zh_score")
def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


@METRICS.register("count_score")
def count_score(prediction: str, ground_truth: str, **_) -> float:
    return _number_share(prediction, ground_truth)


@METRICS.register("code_sim_score")
def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """fuzz.ratio / 100 of the first predicted line holding none of ` # // (empty if none)."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, ground_truth) / 100


def ruler_postprocess(prediction: str) -> str:
    """RULER: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


@METRICS.register("string_match_all")
def string_match_all(prediction: str, answers: Sequence[str], **_) -> float:
    """Share of references found (case-insensitive substring) in the prediction; RULER's niah/vt/cwe/fwe score."""
    pred = ruler_postprocess(prediction).lower()
    return sum(r.lower() in pred for r in answers) / len(answers)


@METRICS.register("string_match_part")
def string_match_part(prediction: str, answers: Sequence[str], **_) -> float:
    """1 if any reference is found in the prediction; RULER's qa score."""
    pred = ruler_postprocess(prediction).lower()
    return float(any(r.lower() in pred for r in answers))


@METRICS.register("first_number_match")
def first_number_match(prediction: str, answers: Sequence[str], **_) -> float:
    """Passkey: 1 if the first integer in the prediction equals a reference (exact numeric match)."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group(0) in {str(a) for a in answers})


# Metrics that score the whole reference list at once (RULER); the rest take the max over references (LongBench).
LIST_METRICS = frozenset({"string_match_all", "string_match_part", "first_number_match"})
# Metrics that test references as substrings: once a prefix of the answer scores 1, every continuation does too,
# so generation may stop there without changing the score (first_number_match may not: "12" can grow to "123").
SATURATING = frozenset({"string_match_all", "string_match_part"})


def saturated(metric: str, prediction: str, answers: Sequence[str]) -> bool:
    """True when `prediction` already has `metric`'s full score and no continuation of it can lower it."""
    base, _, _ = metric.partition("@")   # a first line that scores 1 keeps it: later text only extends that line
    return base in SATURATING and score(metric, prediction, answers) >= 1.0


def first_line(prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0]


def check_metric(metric: str) -> None:
    """Raise ValueError (with "did you mean") unless `metric` names a registered metric, optionally @first_line."""
    base, sep, rule = metric.partition("@")
    METRICS.get(base)
    if sep and f"@{rule}" != FIRST_LINE:
        raise ValueError(f"metric suffix must be {FIRST_LINE!r}, got {metric!r}")


def metric_names() -> list[str]:
    return METRICS.names()


def score(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """Score one prediction in [0, 1]: LongBench's max over answers, or RULER's list metrics."""
    check_metric(metric)
    base = metric.partition("@")[0]
    if metric.endswith(FIRST_LINE):
        prediction = first_line(prediction)
    if isinstance(answers, str):
        answers = [answers]
    fn = METRICS.get(base)
    if base in LIST_METRICS:
        return float(fn(prediction, list(answers)))
    return max((float(fn(prediction, gt, all_classes=all_classes or ())) for gt in answers), default=0.0)
