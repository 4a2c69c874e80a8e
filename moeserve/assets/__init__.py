"""Files that ship inside the package: the demo model that `moeserve serve` runs by default.

`demo-moe/` is a small Mixtral-format MoE (3 layers, 8 experts, top-2) trained by
scripts/train_demo.py on the verifiable tasks of moeserve/demo_tasks.py.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_MODEL_NAME = "demo-moe"


def demo_model_path() -> Path:
    """Directory of the packaged demo model (Hugging Face layout).

    ValueError when the package was installed without its data files (the CLI turns that
    into exit status 2 with the message).
    """
    # Packages installed from a wheel or in editable mode are plain directories, so the
    # Traversable is a real path; a zipped install would not be, and is refused below.
    path = Path(str(files(__package__) / DEMO_MODEL_NAME))
    if not (path / "config.json").is_file():
        raise ValueError(
            f"the packaged demo model is missing ({path}); reinstall moeserve or pass --model DIR"
        )
    return path


def model_or_demo(model: str | Path | None) -> str:
    """`model` when given (the --model flag), else the packaged demo model's directory."""
    return str(model) if model else str(demo_model_path())
