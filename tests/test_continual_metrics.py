"""Continual metrics on hand-computed accuracy matrices (the arithmetic is written next to each check).

R[i, j] = score on task i after training task j; NaN = not evaluated.
"""
import math

import numpy as np
import pytest

from jaxtree_lora.evaluation import continual

NAN = np.nan

# Task 0 rises after task 1 (90 -> 95) then falls (70); task 1 improves after task 2 (60 -> 65).
R = np.array([[90.0, 95.0, 70.0],
              [NAN, 60.0, 65.0],
              [NAN, NAN, 40.0]])


def test_average_accuracy_is_trace_op():
    # OP = (R[0,2] + R[1,2] + R[2,2]) / 3 = (70 + 65 + 40) / 3 = 175 / 3
    assert continual.average_accuracy(R) == pytest.approx(175 / 3), "OP averages the last column"


def test_average_incremental_accuracy():
    # stage means: 90; (95 + 60) / 2 = 77.5; (70 + 65 + 40) / 3 = 175/3 -> (90 + 77.5 + 175/3) / 3 = 1355/18
    assert continual.average_incremental_accuracy(R) == pytest.approx(1355 / 18)


def test_bwt_trace_clips_each_task_at_zero_and_divides_by_all_tasks():
    # (min(70 - 90, 0) + min(65 - 60, 0) + min(40 - 40, 0)) / 3 = (-20 + 0 + 0) / 3
    assert continual.bwt_trace(R) == pytest.approx(-20 / 3), \
        "TRACE code: the improvement of task 1 is clipped to 0 and the last task counts in the denominator"


def test_bwt_paper_is_unclipped_forgetting_over_t_minus_one():
    # ((R[0,0] - R[0,2]) + (R[1,1] - R[1,2])) / 2 = ((90 - 70) + (60 - 65)) / 2 = 15 / 2
    assert continual.bwt_paper(R) == pytest.approx(7.5), "paper form: positive = forgetting, no clipping, 1/(T-1)"
    # with the last task in the mean: (20 - 5 + 0) / 3
    assert continual.bwt_paper(R, include_last=True) == pytest.approx(5.0)


def test_forgetting_uses_the_peak_not_the_diagonal():
    # task 0: max(90, 95) - 70 = 25 (its peak came after task 1); task 1: max(60) - 65 = -5 -> (25 - 5) / 2
    assert continual.forgetting(R) == pytest.approx(10.0), "Chaudhry forgetting: drop from the best earlier score"


def test_all_average_is_the_mean_of_the_evaluated_triangle():
    # (90 + 95 + 70 + 60 + 65 + 40) / 6 = 420 / 6
    assert continual.all_average(R) == pytest.approx(70.0)


def test_forward_transfer_against_zero_shot_scores():
    full = np.array([[90.0, 95.0, 70.0],
                     [30.0, 60.0, 65.0],
                     [20.0, 35.0, 40.0]])
    reference = [10.0, 25.0, 15.0]
    # ((R[1,0] - b1) + (R[2,1] - b2)) / 2 = ((30 - 25) + (35 - 15)) / 2 = 25 / 2
    assert continual.forward_transfer(full, reference) == pytest.approx(12.5)
    assert math.isnan(continual.forward_transfer(R, reference)), "no R[i, i-1] evaluated -> FWT undefined"
    assert math.isnan(continual.forward_transfer(full, None))
    with pytest.raises(ValueError, match="one value per task"):
        continual.forward_transfer(full, [1.0, 2.0])
    # the upper-triangle scores enter forgetting's max too: task 1 peaked at 60 -> same as before
    assert continual.forgetting(full) == pytest.approx(10.0)


def test_a_partial_column_is_ignored_until_complete():
    partial = R.copy()
    partial[1:, 2] = NAN  # evaluation after task 2 under way: only R[0, 2] written
    assert continual.completed_tasks(partial) == 2
    # T = 2: OP = (95 + 60) / 2; BWT_trace = (min(95 - 90, 0) + 0) / 2 = 0; BWT_paper = (90 - 95) / 1
    assert continual.average_accuracy(partial) == pytest.approx(77.5)
    assert continual.bwt_trace(partial) == pytest.approx(0.0)
    assert continual.bwt_paper(partial) == pytest.approx(-5.0)
    # forgetting: max_{j<1} R[0, j] - R[0, 1] = 90 - 95
    assert continual.forgetting(partial) == pytest.approx(-5.0)
    assert continual.summary(partial)["final_scores"] == [95.0, 60.0]


def test_one_task_and_no_task():
    one = np.full((3, 3), NAN)
    one[0, 0] = 80.0
    assert continual.completed_tasks(one) == 1
    assert continual.average_accuracy(one) == 80.0 and continual.bwt_trace(one) == 0.0
    assert math.isnan(continual.bwt_paper(one)) and math.isnan(continual.forgetting(one)), \
        "nothing can be forgotten yet: undefined, not 0"
    assert continual.bwt_paper(one, include_last=True) == 0.0
    empty = continual.empty_matrix(3)
    summary = continual.summary(empty)
    assert summary["tasks_trained"] == 0 and summary["final_scores"] == []
    assert all(math.isnan(summary[k]) for k in ("average_accuracy", "bwt_trace", "bwt_paper", "forgetting"))


def test_summary_holds_every_metric():
    summary = continual.summary(R)
    assert summary["num_tasks"] == 3 and summary["tasks_trained"] == 3
    assert summary["average_accuracy"] == pytest.approx(175 / 3)
    assert summary["bwt_trace"] == pytest.approx(-20 / 3) and summary["bwt_paper"] == pytest.approx(7.5)
    assert summary["forgetting"] == pytest.approx(10.0) and summary["all_average"] == pytest.approx(70.0)
    assert math.isnan(summary["fwt"]), "no reference scores given"


def test_json_nulls_are_read_as_not_evaluated():
    from_json = [[90.0, 95.0, 70.0], [None, 60.0, 65.0], [None, None, 40.0]]
    assert continual.average_accuracy(from_json) == pytest.approx(175 / 3)


def test_bad_matrices_raise_with_the_fix():
    with pytest.raises(ValueError, match=r"square \[num_tasks, num_tasks\]"):
        continual.summary(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="multiply fractions by 100"):
        continual.summary(np.array([[0.9, NAN], [NAN, 101.0]]))
    with pytest.raises(ValueError, match="use NaN"):
        continual.summary(np.array([[np.inf]]))
