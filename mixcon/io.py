"""Files written whole or not at all: a reader (or a resumed run) never sees a half-written one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it over `path` (a failed write
    removes the temporary file and leaves `path` as it was)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure_atomic(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Lay out a matplotlib figure, write it to a temporary file beside `path` (of its format), rename that
    over `path` and close the figure: a kill leaves the previous image or the new one, never a torn one."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    fig.savefig(tmp, **savefig_kwargs)
    plt.close(fig)
    tmp.replace(path)
