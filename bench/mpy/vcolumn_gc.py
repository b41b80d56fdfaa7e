# hil/vcolumn_main.py with the collector run after every GC_THRESHOLD bytes allocated, so the
# heap_used it reports (gc.mem_alloc()) is live data plus at most about GC_THRESHOLD bytes of
# garbage, not whatever garbage piled up since the heap last filled. Same arguments as
# vcolumn_main.py (it reads them from sys.argv). MicroPython-compatible code only.
#
# Run with a copy of the bundle as the working directory (the board's filesystem root, its
# column.json beside boot.py and firmware/): sys.path[0] (this script's folder) becomes '', a
# board's first entry, so the firmware is imported as on a board and every module's path
# (interned as its __file__) is the board's, firmware/app.mpy. That path is printed first
# ("vcolumn_gc: firmware.app PATH"): main.py's import on a board, which vcolumn_main.py repeats.
import gc
import sys

GC_THRESHOLD = 1024

gc.threshold(GC_THRESHOLD)
here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path[0] = ""
sys.path.append(here + "/../../hil")
from firmware import app  # noqa: E402

print("vcolumn_gc: firmware.app", app.__file__)
import vcolumn_main  # noqa: E402, F401  (runs the column until killed)
