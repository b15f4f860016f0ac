"""The README's test command is exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = [line for line in ci_lines if "pytest" in line and not line.startswith("#")]
    assert len(command) == 1
    assert command[0] in (ROOT / "README.md").read_text().splitlines()


def test_readme_subclassing_example_runs(monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text.split("## Write a new PDE", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "L.Trainer(max_steps=2000)" in block
    block = block.replace(
        "L.Trainer(max_steps=2000)",
        "L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, "
        "enable_progress_bar=False, accelerator='cpu')",
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert 0 < namespace["problem"].relative_l2_error() < 10
