# Runs a corpus through a firmware fuzz harness, in either interpreter (fuzz/fw/mpy.py starts
# it in the MicroPython unix port through hil.rig.firmware_proc.run_firmware).
#     mpy_run.py HARNESS CORPUS WORKDIR
# HARNESS: modbus_harness or cbor_harness. CORPUS: inputs as [4-byte big-endian length][bytes].
# One line per input, tab-separated: index, status (ok, finding, crash), digest, microseconds,
# the label or message (tabs and newlines replaced by "|").
import sys
import time


def _ticks_us():
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.perf_counter() * 1000000)


def _elapsed(t0):
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(time.ticks_us(), t0)
    return _ticks_us() - t0


def _clean(text):
    return str(text).replace("\t", " ").replace("\n", "|").replace("\r", " ")


def main(args):
    module = __import__("fuzz.fw." + args[0], None, None, ("Harness",))
    if not hasattr(module, "Harness"):   # MicroPython returns the top package
        module = getattr(module.fw, args[0])
    from fuzz.fw.common import Finding

    harness = module.Harness(args[2])
    index = 0
    out = sys.stdout
    f = open(args[1], "rb")   # read one input at a time: the heap is the column's, not the corpus's
    while True:
        head = f.read(4)
        if len(head) < 4:
            break
        data = f.read((head[0] << 24) | (head[1] << 16) | (head[2] << 8) | head[3])
        t0 = _ticks_us()
        harness.digest = 0
        try:
            label = harness.run(data)
            status = "ok"
            text = "" if label is None else label
        except Finding as exc:
            status = "finding"
            text = str(exc)
        except Exception as exc:  # a crash of the code under test
            status = "crash"
            text = "%s: %s" % (type(exc).__name__, exc)
        us = _elapsed(t0)
        out.write("%d\t%s\t%d\t%d\t%s\n" % (index, status, harness.digest, us, _clean(text)[:400]))
        index += 1
        data = None
    f.close()
    out.write("done\t%d\n" % index)


main(sys.argv[1:])
