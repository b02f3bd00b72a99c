"""A third-party package adds one defense of each kind by entry point alone, and the registry-wide
conformance suite picks every one of them up (issue 14, "Done when").

The package (tests/entry_point_package/poisonbench_ep_defenses.py) is installed for the test as a
distribution: its module and a ``*.dist-info`` folder declaring four entry points in the group
``poisonbench.defenses``, on the import path of a fresh pytest process that runs
tests/test_conformance.py. Nothing in the engine or the tests names these defenses."""
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
MODULE = "poisonbench_ep_defenses"
DEFENSES = {"ep-training": "training", "ep-task": "task", "ep-filter": "filter", "ep-repair": "repair"}


def install(site: Path) -> None:
    """The package as pip would leave it: the module, and its metadata with the entry points."""
    site.mkdir()
    shutil.copy(TESTS / "entry_point_package" / f"{MODULE}.py", site)
    dist = site / "poisonbench_ep_defenses-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: poisonbench-ep-defenses\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[poisonbench.defenses]\n" + "".join(f"{name} = {MODULE}\n" for name in DEFENSES))


def env_with(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_the_conformance_suite_runs_every_kind_of_an_entry_point_package(tmp_path):
    site = tmp_path / "site"
    install(site)
    listing = subprocess.run([sys.executable, "-m", "poisonbench", "list", "defenses"], env=env_with(site),
                             capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    for name, kind in DEFENSES.items():
        assert any(name in line and kind in line for line in listing.stdout.splitlines()), (name, listing.stdout)

    report = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "test_conformance.py"), "-q", "-p", "no:cacheprovider",
         "-k", " or ".join(DEFENSES), f"--junitxml={report}"],
        env=env_with(site), cwd=TESTS.parent, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    cases = [(c.get("name"), [e.tag for e in c]) for c in ET.parse(report).getroot().iter("testcase")]
    for name in DEFENSES:
        ran = {case.split("[")[0] for case, outcome in cases if name in case and not outcome}
        # every kind of test the suite has for a defense: parameters, checks before training, a cell end to end
        assert ran >= {"test_parameters_round_trip_from_their_command_line_strings",
                       "test_every_cell_passes_the_checks_before_training",
                       "test_one_cell_runs_end_to_end_with_every_number_in_range"}, (name, sorted(ran))
