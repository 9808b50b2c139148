"""Task metrics: LongBench's definitions on hand-checked examples, RULER's string matching, the score() rules.

Reference values marked "rouge 1.0.1" / "fuzzywuzzy 0.18.0" were computed with those packages (the ones LongBench's
requirements install); the ports in smartkv.metrics.textsim give the same floats.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartkv.metrics import metric_names, score
from smartkv.metrics.task import (saturated, classification_score, code_sim_score, count_score, normalize_answer,
                                  normalize_zh_answer, qa_f1_score, retrieval_score, retrieval_zh_score, rouge_score,
                                  string_match_all, string_match_part)
from smartkv.metrics.textsim import fuzz_ratio, rouge_l_f


def test_normalize_answer_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert normalize_answer("an apple-pie") == "applepie"  # punctuation removed before splitting
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_normalize_zh_answer_drops_chinese_punctuation_and_all_whitespace():
    assert normalize_zh_answer("你好，世界！ Hello World。") == "你好世界helloworld"


def test_qa_f1_is_token_bag_f1_after_normalisation():
    assert qa_f1_score("The river Tarn.", "Tarn") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert qa_f1_score("Paris", "paris!") == 1.0
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("", "Paris") == 0.0


def test_score_takes_the_max_over_answers():
    assert score("qa_f1_score", "Tarn", ["the river Tarn", "Tarn"]) == 1.0
    assert score("qa_f1_score", "Tarn", ["river Tarn"]) == pytest.approx(2 / 3)


def test_first_line_rule_scores_only_the_first_non_leading_line():
    prediction = "\n\nParis\nQuestion: what else is in France?"
    assert score("qa_f1_score@first_line", prediction, ["Paris"]) == 1.0
    assert score("qa_f1_score", prediction, ["Paris"]) < 0.5


def test_rouge_l_matches_the_rouge_package():
    assert rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.7999999950000002,
                                                                                          abs=1e-15)
    # rouge 1.0.1: two sentences each, union LCS over word sets
    assert rouge_score("The cat sat on the mat. It was happy.",
                       "A cat was on the mat. The cat was happy.") == pytest.approx(0.823529406782007, abs=1e-15)


def test_rouge_of_an_empty_prediction_is_zero():
    assert rouge_score("", "the cat") == 0.0
    assert rouge_score("...", "the cat") == 0.0


def test_rouge_does_not_overflow_on_long_sentences():
    # The package's recursive LCS traceback takes ~1,200 frames here and overflows; the port walks iteratively.
    reference = " ".join(f"w{i}" for i in range(1200))
    assert rouge_l_f("w0 w1 w1199", reference) == pytest.approx(2 * (3 / 1200) / (1 + 3 / 1200), abs=1e-7)


def test_classification_counts_matching_class_names():
    classes = ["City", "Country", "Individual"]
    assert classification_score("City", "City", all_classes=classes) == 1.0
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert classification_score("Individual", "City", all_classes=classes) == 0.0


def test_classification_keeps_longbench_removal_while_iterating():
    # "Num" is dropped (a proper substring of the truth); the iterator then skips "Number", which stays.
    classes = ["Num", "Number", "Number of something"]
    assert classification_score("Number of something", "Number of something", all_classes=classes) == 0.5


def test_retrieval_and_count_score_share_of_numbers_that_are_right():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_zh_score("段落2", "段落2") == 1.0
    assert count_score("There are 5 unique paragraphs; 5 in total.", "5") == 1.0
    assert count_score("4 or 5", 5) == 0.5


def test_code_sim_takes_first_line_without_comment_markers():
    prediction = "\n# the next line\n    return total\nprint(total)"
    assert code_sim_score(prediction, "    return total") == 1.0
    assert code_sim_score("// only a comment", "x = 1") == 0.0  # no usable line -> "" -> ratio 0
    assert code_sim_score("return x", "return y") == 0.88  # fuzzywuzzy 0.18.0 (difflib): 88


def test_fuzz_ratio_matches_fuzzywuzzy_edge_cases():
    assert fuzz_ratio("", "") == 100  # equality is checked before emptiness
    assert fuzz_ratio("", "a") == 0
    assert fuzz_ratio("    return total", "return total") == 86  # fuzzywuzzy 0.18.0


def test_string_match_all_and_part_follow_ruler():
    prediction = " The values are 123 and ABC-def.\x00"
    assert string_match_all(prediction, ["123", "abc-DEF", "789"]) == pytest.approx(2 / 3)
    assert string_match_part(prediction, ["789", "123"]) == 1.0
    assert string_match_part(prediction, ["789"]) == 0.0
    assert score("string_match_all", prediction, ["123", "abc-def"]) == 1.0


def test_first_number_match_is_exact_on_the_first_number():
    assert score("first_number_match", " 4217. Remember it.", ["4217"]) == 1.0
    assert score("first_number_match", "42170", ["4217"]) == 0.0
    assert score("first_number_match", "The pass key is 12 or 4217", ["4217"]) == 0.0
    assert score("first_number_match", "no idea", ["4217"]) == 0.0


def test_unknown_metric_names_raise_with_suggestion():
    with pytest.raises(ValueError, match="did you mean 'qa_f1_score'"):
        score("qa_f1_scor", "a", ["a"])
    with pytest.raises(ValueError, match="@first_line"):
        score("qa_f1_score@last_line", "a", ["a"])


def test_metric_registry_lists_longbench_and_ruler_names():
    assert {"qa_f1_score", "qa_f1_zh_score", "rouge_score", "rouge_zh_score", "classification_score",
            "retrieval_score", "retrieval_zh_score", "count_score", "code_sim_score", "string_match_all",
            "string_match_part", "first_number_match"} <= set(metric_names())


@settings(max_examples=60, deadline=None)
@given(prediction=st.text(max_size=60), answer=st.text(min_size=1, max_size=30))
def test_scores_lie_in_unit_interval(prediction, answer):
    for metric in ("qa_f1_score", "rouge_score", "code_sim_score", "count_score", "string_match_all",
                   "string_match_part", "first_number_match"):
        assert 0.0 <= score(metric, prediction, [answer]) <= 1.0
    assert 0.0 <= score("classification_score", prediction, [answer], all_classes=[answer, "x"]) <= 1.0


class TestChinese:
    """The Chinese variants segment with jieba, as LongBench does."""

    @pytest.fixture(autouse=True)
    def _jieba(self):
        pytest.importorskip("jieba")

    def test_qa_f1_zh_segments_words_and_drops_punctuation(self):
        assert score("qa_f1_zh_score", "北京。", ["北京"]) == 1.0
        assert score("qa_f1_zh_score", "首都是北京", ["北京"]) == pytest.approx(0.5)  # 首都/是/北京 vs 北京

    def test_rouge_zh_joins_jieba_words_before_rouge(self):
        # 会议 讨论 了 明年 的 预算 和 招聘 计划 。 vs 会议 讨论 了 预算 。 : R = 1, P = 1/2 (rouge 1.0.1)
        assert score("rouge_zh_score", "会议讨论了明年的预算和招聘计划。", ["会议讨论了预算。"]) == pytest.approx(
            0.6666666622222223, abs=1e-15)


@pytest.mark.parametrize("metric", ["string_match_all", "string_match_part", "string_match_all@first_line"])
def test_a_saturated_prefix_keeps_its_full_score_whatever_follows(metric):
    answers = ["4821", "blue"]
    full = "The numbers are 4821 and blue.\nThen 17 more lines"
    prefixes = [full[:i] for i in range(len(full) + 1)]
    first = next(i for i, p in enumerate(prefixes) if saturated(metric, p, answers))
    assert all(score(metric, p, answers) == 1.0 for p in prefixes[first:])
    assert not any(saturated(metric, p, answers) for p in prefixes[:first])


def test_first_number_match_never_saturates():
    # "12" scores 1 against "12" but the next token may make it "123": generation must go on
    assert score("first_number_match", "12", ["12"]) == 1.0
    assert not saturated("first_number_match", "12", ["12"])
