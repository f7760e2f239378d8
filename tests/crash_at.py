"""Run a Python script and SIGKILL it the Nth time it enters a given function: a kill at an exact instant.

    CRASH_AT=ddpm_hf.training.durable_io:replace:1 python tests/crash_at.py examples/train.py ARGS...

`CRASH_AT` is `module:function:N`. Every name bound to that function in a module loaded once
`ddpm_hf.training` is imported (so `from x import f` aliases too) is rebound to a wrapper that counts
calls and, at the Nth, sends the process SIGKILL, which no handler can catch: as if the machine had
been preempted at that instant. The script then runs as `__main__`, as `python script.py` would run it.
"""

import functools
import importlib
import os
import runpy
import signal
import sys


def kill_at(module_name: str, function_name: str, nth: int):
    target = getattr(importlib.import_module(module_name), function_name)
    calls = 0

    @functools.wraps(target)
    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return target(*args, **kwargs)

    for module in list(sys.modules.values()):
        for name, value in list(vars(module).items()):
            if value is target:
                setattr(module, name, counting)


if __name__ == "__main__":
    import ddpm_hf.training  # noqa: F401  (everything that may call the function, loaded before rebinding it)

    module_name, function_name, nth = os.environ["CRASH_AT"].rsplit(":", 2)
    kill_at(module_name, function_name, int(nth))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
