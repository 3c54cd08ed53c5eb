"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(example.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "inc_lora" in printed and "probe+prototype" in printed
    assert (tmp_path / "runs" / "example" / "results.json").is_file()
