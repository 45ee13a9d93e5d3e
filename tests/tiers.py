"""Two tiers of tests, one command each.

``python -m pytest`` runs the fast tier: every unit and component test. ``python -m pytest --full``
(what CI runs) adds the tests marked ``slow`` (end to end, DDP, learning, compile, real processes) or
``slurm`` (a local Slurm cluster). Each test has a time limit (pytest-timeout): a hang fails with its
name instead of running into CI's limit. The fast tier keeps a budget: a test outside the full set
whose setup and call take longer than FAST_TEST_BUDGET_S (scaled by how slow this machine is today,
below) fails the session, naming it, so the fast tier cannot silently grow back.
"""
import os
import time

import pytest
import torch

FULL_ONLY = ("slow", "slurm")
_BUDGET = os.environ.get("FCMAE_FAST_TEST_BUDGET_S", "20")  # seconds on a fast day, or "off"
FAST_TEST_BUDGET_S = None if _BUDGET == "off" else float(_BUDGET)
FAST_TIMEOUT_S, FULL_TIMEOUT_S = 300, 900
# The calibration workload's best time on a fast day of these 2-core machines (2026-12-03, when the
# whole suite took 21:50); the same machines run up to ~2.6x slower on other days, and the budget
# scales with them.
CALIBRATION_FAST_DAY_S = 0.30


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full set: also the tests marked slow or slurm (CI runs this)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: in the full set only (--full): end to end, DDP, learning, "
                                       "compile, real processes; anything over a few seconds")
    config.addinivalue_line("markers", "slurm: in the full set only (--full): jobs on a local Slurm cluster "
                                       "(launch/local_slurm.sh; root and Debian's slurm packages)")
    if not config.pluginmanager.hasplugin("timeout"):  # the marks below stay valid without the plugin
        config.addinivalue_line("markers", "timeout(seconds): a per-test limit (pytest-timeout)")


def full_only(item) -> bool:
    return any(item.get_closest_marker(m) for m in FULL_ONLY)


def pytest_collection_modifyitems(config, items):
    for item in items:  # an explicit @pytest.mark.timeout wins
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FULL_TIMEOUT_S if full_only(item) else FAST_TIMEOUT_S))
    if config.getoption("--full"):
        return
    dropped = [i for i in items if full_only(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not full_only(i)]


def pytest_report_header(config):
    if config.getoption("--full"):
        return "tiers: the full set (--full)"
    return "tiers: the fast tier; `python -m pytest --full` adds the tests marked slow or slurm"


FAST_TIER_DURATIONS: dict[str, float] = {}  # test id -> setup + call seconds, tests outside the full set


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call") and not any(m in report.keywords for m in FULL_ONLY):
        FAST_TIER_DURATIONS[report.nodeid] = FAST_TIER_DURATIONS.get(report.nodeid, 0.0) + report.duration


def machine_slowness() -> float:
    """How much slower than a fast day this machine runs a fixed CPU workload now (>= 1)."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(15):
            conv(x).square().mean().backward()
        best = min(best, time.perf_counter() - start)
    return max(1.0, best / CALIBRATION_FAST_DAY_S)


def pytest_sessionfinish(session, exitstatus):
    durations = FAST_TIER_DURATIONS
    if not durations or FAST_TEST_BUDGET_S is None:
        return
    slowest = max(durations.values())
    if slowest <= FAST_TEST_BUDGET_S:
        return
    slowness = machine_slowness()
    budget = FAST_TEST_BUDGET_S * slowness
    over = sorted(((d, n) for n, d in durations.items() if d > budget), reverse=True)
    if not over:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"fast-tier budget: {len(over)} test(s) outside the full set took longer than {budget:.3g} s "
             f"({FAST_TEST_BUDGET_S:.3g} s on a fast day x {slowness:.2f}, this machine's slowness now):"]
    lines += [f"  {d:6.1f} s  {n}" for d, n in over]
    lines.append("make them faster, or mark them @pytest.mark.slow (full set only); see DEVELOPING.md")
    if reporter is not None:
        reporter.write_sep("=", "fast-tier budget exceeded", red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
