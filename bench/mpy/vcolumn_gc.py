# hil/vcolumn_main.py with the collector run after every GC_THRESHOLD bytes allocated, so the
# heap_used it reports (gc.mem_alloc()) is live data plus at most about GC_THRESHOLD bytes of
# garbage, not whatever garbage piled up since the heap last filled. Same arguments as
# vcolumn_main.py (it reads them from sys.argv). MicroPython-compatible code only.
import gc
import sys

GC_THRESHOLD = 1024

gc.threshold(GC_THRESHOLD)
here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.append(here + "/../../hil")
import vcolumn_main  # noqa: E402, F401  (runs the column until killed)
