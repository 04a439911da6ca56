"""The peak memory of a child process, from /proc (Linux), for tests that bound what an input costs.

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` will not do: a process started by fork and exec
from a larger one (pytest, after the tests before it) reports that process's peak as its own.
``VmHWM`` in ``/proc/self/status`` belongs to the new process, and writing ``5`` to
``/proc/self/clear_refs`` starts it again from the current RSS, so a child can measure one call.
A kernel that refuses the reset leaves the peak since exec, which only makes a bound stricter.

Child scripts start with ``exec(PRELUDE)`` (or the text itself) and call ``reset_peak()`` before the
call they measure and ``peak_growth()`` after it.
"""

from __future__ import annotations

PRELUDE = '''
def _status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak():
    """Start the peak RSS again from the RSS now (where the kernel allows it); returns that RSS in bytes."""
    global _baseline
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    _baseline = _status_kib("VmRSS") * 1024
    return _baseline


def peak_growth():
    """Bytes the peak RSS rose above the RSS at the last ``reset_peak()``."""
    return max(0, _status_kib("VmHWM") * 1024 - _baseline)
'''
