# Heap taken by code: gc.mem_alloc() after a collection, first in the empty interpreter, then
# with what the harness needs (asyncio and the submodules the column loads, json, the virtual
# board's `machine`), then with every
# firmware module a running column loads (one name a line in the file argv[1], as
# bench/mpy/app_modules.py listed them) imported one at a time with a collection after each,
# as App.run() does. With argv[2] (hil/vcolumn_main.py), also the harness script's own code:
# its source up to the line that starts the column, compiled and run (it only defines
# functions). Prints one JSON line, with firmware.app's __file__ ("app_file") to show where
# the firmware was imported from. MicroPython-compatible code only.
#
# Run with the bundle's folder as the working directory: sys.path[0] (the script's own folder)
# becomes '', a board's first entry, so the firmware is imported as on a board, where the
# working directory is the filesystem root, and every module's path (interned as its
# __file__) is the board's: firmware/app.mpy, not a temporary folder's.
import gc
import json
import sys

sys.path[0] = ""
gc.collect()
empty = gc.mem_alloc()
import asyncio  # noqa: E402, F401

import machine  # noqa: E402, F401

with open(sys.argv[1]) as f:
    names = [n.strip() for n in f.read().split("\n") if n.strip()]
for name in names:   # the library's submodules the column loads on demand count as platform
    if not (name == "firmware" or name.startswith("firmware.")):
        __import__(name)
gc.collect()
platform = gc.mem_alloc()
for name in names:
    if not (name == "firmware" or name.startswith("firmware.")):
        continue
    __import__(name)
    gc.collect()
gc.collect()
code = gc.mem_alloc()
harness = -1
if len(sys.argv) > 2:
    with open(sys.argv[2]) as f:
        src = f.read()
    cut = src.find("\nif len(sys.argv)")
    if cut > 0:
        scope = {"__name__": "vcolumn_main"}
        exec(src[:cut], scope)
        src = None
        gc.collect()
        harness = gc.mem_alloc() - code
app = sys.modules.get("firmware.app")
print(json.dumps({"empty": empty, "platform": platform, "code": code, "modules": len(names),
                  "harness": harness, "heap_total": gc.mem_alloc() + gc.mem_free(),
                  "app_file": getattr(app, "__file__", None)}))
