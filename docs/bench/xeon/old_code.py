"""For the A/B scripts here: a file of this repository as it was at an earlier commit, as a module."""
import subprocess
import sys
import types


def old_module(commit: str, path: str) -> types.ModuleType:
    """`path` at `commit` (read with git from the working directory's checkout), executed as a module of its own,
    registered in sys.modules (dataclasses look their module up there)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"old_{commit}_{path}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module
