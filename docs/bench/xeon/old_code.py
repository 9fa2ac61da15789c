"""For the A/B scripts here: a file of this repository as it was at an earlier commit, as a module; the variants'
timing, alternating."""
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable


def old_module(commit: str, path: str) -> types.ModuleType:
    """`path` at `commit` (read with git from the working directory's checkout), executed as a module of its own,
    registered in sys.modules (dataclasses look their module up there)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"old_{commit}_{path}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def alternating_medians(names: list[str], use: Callable[[str], None], fn: Callable[[], None], rounds: int
                        ) -> dict[str, float]:
    """Seconds of `fn` under each variant (`use(name)` switches to it): the variants take turns, in alternating
    order, for `rounds` rounds after one warm-up round; medians."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in (names if r % 2 else names[::-1]):
            use(name)
            start = time.perf_counter()
            fn()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
