"""The README's notebook snippet runs as written (its python blocks are executed)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_vlm_notebook_snippet_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "ReportGenerator" in b)
    snippet = snippet.replace('"/tmp/kervljepa"', repr(str(tmp_path)))
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)   # noqa: S102  (our own README)
    assert namespace["out"].visual.cls_logits.shape == (1, 18)
