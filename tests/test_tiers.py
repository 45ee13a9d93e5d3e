"""The two tiers (tests/tiers.py): the fast tier leaves out the full set's tests, every test gets a
time limit, and a fast-tier test over the budget fails the session by name."""
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SAMPLE = """
import time
import pytest

def test_quick():
    pass

@pytest.mark.slow
def test_end_to_end(request):
    assert request.node.get_closest_marker("timeout").args[0] == 900

@pytest.mark.slurm
def test_on_the_cluster():
    pass

def test_limits(request):
    assert request.node.get_closest_marker("timeout").args[0] == {limit}

def test_sleepy():
    time.sleep({sleep})
"""


def _run(pytester, *args, sleep=0.0, budget="20", limit=300):
    pytester.makepyfile(test_sample=SAMPLE.format(sleep=sleep, limit=limit))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(TESTS))
        mp.setenv("FCMAE_FAST_TEST_BUDGET_S", budget)
        return pytester.runpytest_subprocess("-p", "tiers", "-p", "no:cacheprovider", *args)


def test_the_fast_tier_leaves_out_the_full_set_and_fails_a_test_over_the_budget_by_name(pytester):
    """One subprocess for the fast tier's three rules (each run of it costs an import of torch)."""
    result = _run(pytester, sleep=1.5, budget="0.05")  # 0.05 s x this machine's slowness (>= 1, < 30)
    result.assert_outcomes(passed=3, deselected=2)  # test_limits asserts the fast tier's 300 s
    result.stdout.fnmatch_lines(["*tiers: the fast tier*--full*"])
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*fast-tier budget exceeded*", "*test_sample.py::test_sleepy*",
                                 "*@pytest.mark.slow*"])
    assert "test_quick" not in result.stdout.str().split("fast-tier budget exceeded")[1]


def test_full_runs_everything_each_with_its_tiers_limit_and_the_budget_can_be_off(pytester):
    result = _run(pytester, "--full", sleep=1.5, budget="off")  # test_end_to_end asserts 900 s
    result.assert_outcomes(passed=5)
    assert result.ret == 0
