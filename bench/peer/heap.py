"""The heap tracker's counters (bench/peer/heap_tracker.c, LD_PRELOAD) from Python, for every peer."""
import ctypes


def heap_tracker():
    """(peak, current, reset) from the preloaded heap tracker, else None."""
    lib = ctypes.CDLL(None)
    try:
        peak, current, reset = lib.heap_tracker_peak, lib.heap_tracker_current, lib.heap_tracker_reset_peak
    except AttributeError:
        return None
    peak.restype = current.restype = ctypes.c_longlong
    return peak, current, reset
