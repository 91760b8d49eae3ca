import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README


def test_readme_library_example_runs_and_keeps_masks(tmp_path):
    code = re.search(r"```python\n(import torch.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    import dst

    layers = list(dst.masked_layers(model))
    assert layers and all((layer.weight[~layer.mask] == 0).all() for layer in layers)
    assert namespace["step"] == 9_999
