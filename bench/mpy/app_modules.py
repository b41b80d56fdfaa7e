# Which firmware modules (and asyncio submodules) a running column has loaded: boots the real
# app (firmware/app.py) on the virtual board with the given config, lets App.run() load its
# link and meter code, and prints the module names as a JSON list. MicroPython-compatible
# code only.
#
#   app_modules.py CONFIG METER_PTY LINK_PTY|-
import asyncio
import json
import sys

import machine

from firmware import app as firmware_app
from firmware import hal


async def _main(config, meter_path, link_path):
    board = machine.board
    board.clear()
    board.uart_paths[hal.PINS["meter_uart"]] = meter_path
    if link_path != "-":
        board.uart_paths[hal.PINS["link_uart"]] = link_path
    column = firmware_app.App(machine, config, use_wdt=False)
    task = asyncio.create_task(column.run())
    await asyncio.sleep(0.5)
    names = [k for k in sys.modules if k == "firmware" or k.startswith("firmware.")]
    # Library code the running column loaded on demand (an asyncio submodule such as
    # asyncio.stream, were a link to use one): code, not data, though `import asyncio` alone
    # does not load it.
    names += [k for k in sys.modules if k.startswith("asyncio.")]
    print(json.dumps(sorted(names)))
    task.cancel()


asyncio.run(_main(sys.argv[1], sys.argv[2], sys.argv[3]))
