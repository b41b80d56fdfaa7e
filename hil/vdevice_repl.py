# The MicroPython side of the virtual device (see hil/vdevice.py): a MicroPython unix port
# process that behaves like a board's USB serial console. Its stdin and stdout are one end
# of a serial line pair, its cwd is the board's flash, and it speaks the REPL protocol that
# mpremote and the field tools use: the friendly prompt, raw REPL (Ctrl-A; code; Ctrl-D;
# "OK", output, 0x04, error output, 0x04, ">"), raw-paste mode, Ctrl-B, Ctrl-C, and
# Ctrl-D for a soft reset.
#
#   micropython vdevice_repl.py '{"boot": "power", "mode": "friendly", ...}'
#
# A reset ends the process with an exit code that tells the harness how to start the next
# one (a fresh interpreter and heap, as on a board): 10 soft reset into the raw REPL, 11
# soft reset into the friendly REPL, 12 hard reset (machine.reset()). Lines on stderr
# tell the harness whether user code is running ("vdev:busy" / "vdev:idle"), so that it
# turns a Ctrl-C that arrives meanwhile into SIGINT: a board's UART interrupt does that.
# MicroPython-only code: it runs on the unix port, never under CPython.
import io
import json
import os
import select
import sys
import termios

_EXIT_SOFT_RAW = 10
_EXIT_SOFT_FRIENDLY = 11
_EXIT_HARD = 12
_TO_FRIENDLY = 1    # raw REPL -> friendly REPL (Ctrl-B)
_TO_RAW = 2         # friendly REPL -> raw REPL (Ctrl-A)
_PASTE_WINDOW = 256  # raw-paste flow-control window (boards say 128; this reads all at once)
_RAW_BANNER = b"raw REPL; CTRL-B to exit\n"
_SCRIPT = __file__ if "__file__" in globals() else "vdevice_repl.py"


def _out(data):
    # The harness sets the line's output to turn "\n" into "\r\n", as a board's console
    # does with everything it prints, so "\n" here is "\r\n" on the wire.
    sys.stdout.buffer.write(data)


def _state(word):
    sys.stderr.write("vdev:" + word + "\n")


class Line:
    """The console line (fd 0): reads return what is there; poll waits for more."""

    def __init__(self):
        try:
            attrs = termios.tcgetattr(0)
            attrs[6][6] = 0   # VMIN
            attrs[6][5] = 0   # VTIME
            termios.tcsetattr(0, termios.TCSANOW, attrs)
        except OSError:
            pass  # not a tty (a test pipe): reads block instead
        self.stream = sys.stdin.buffer
        self.poller = select.poll()
        self.poller.register(0, select.POLLIN)
        self.buf = bytearray(512)
        self.n = 0
        self.pos = 0
        self.waited = False

    def byte(self):
        while self.pos >= self.n:
            if not self.waited:
                self.waited = True
                _state("ready")  # booted and waiting for the host's first byte
            self.poller.poll(-1)
            n = self.stream.readinto(self.buf)
            if not n:
                # Readable with nothing to read: the harness closed the line.
                _state("line closed")
                sys.exit(0)
            self.n = n
            self.pos = 0
        c = self.buf[self.pos]
        self.pos += 1
        return c


def _print_exception(exc):
    """A traceback as a board prints it: frames of this script left out."""
    text = io.StringIO()
    sys.print_exception(exc, text)
    for line in text.getvalue().split("\n"):
        if line and _SCRIPT not in line:
            _out(line.encode() + b"\n")


def _reset_code(exc, soft):
    """The exit code for a SystemExit: the virtual board's machine.reset() is a hard reset."""
    if exc.args and exc.args[0] == "machine.reset":
        return _EXIT_HARD
    return soft


def execute(src, g, mode, eof, soft):
    """Compile and run src in the globals g. eof: frame the output as the raw REPL does.
    Returns 0, or an exit code when the code asked for a reset."""
    try:
        if not isinstance(src, str):
            src = src.decode()
        code = compile(src, "<stdin>", mode)
    except BaseException as exc:  # SyntaxError, UnicodeError, MemoryError
        if eof:
            _out(b"\x04")
        _print_exception(exc)
        if eof:
            _out(b"\x04")
        return 0
    return run(code, g, eof, soft)


def run(code, g, eof, soft):
    _state("busy")
    try:
        exec(code, g)
    except SystemExit as exc:
        _state("idle")
        code = _reset_code(exc, soft)
        if eof and code != _EXIT_HARD:
            _out(b"\x04\x04")
        return code
    except BaseException as exc:  # KeyboardInterrupt too: the REPL survives it
        _state("idle")
        if eof:
            _out(b"\x04")
        _print_exception(exc)
        if eof:
            _out(b"\x04")
        return 0
    _state("idle")
    if eof:
        _out(b"\x04\x04")
    return 0


def raw_paste(line, g):
    """Raw-paste mode: flow-controlled upload, then run (no "OK"; 0x04 acks the end)."""
    window = _PASTE_WINDOW  # its two bytes must not hold 0x0a (the line adds a 0x0d)
    _out(b"R\x01" + bytes([window & 0xFF, window >> 8, 1]))
    data = bytearray()
    remain = window
    while True:
        c = line.byte()
        if c in (3, 4):
            _out(b"\x04")
            if c == 3:
                _out(b"\x04")
                _out(b"KeyboardInterrupt: \n\x04")
                return 0
            break
        data.append(c)
        remain -= 1
        if remain == 0:
            _out(b"\x01")
            remain = window
    return execute(bytes(data), g, "exec", True, _EXIT_SOFT_RAW)


def raw_repl(line, g, paste):
    _out(_RAW_BANNER)
    while True:
        _out(b">")
        data = bytearray()
        while True:
            c = line.byte()
            if c == 1:  # Ctrl-A: reset the raw REPL, or "\x05A\x01" asks for raw-paste
                if len(data) == 2 and data[0] == 5:
                    if paste and data[1] == 65:
                        r = raw_paste(line, g)
                        if r:
                            return r
                        data = bytearray()
                        _out(b">")
                    else:
                        # Not supported: mpremote falls back to the plain raw REPL and
                        # sends its code without waiting for a prompt.
                        _out(b"R\x00")
                        data = bytearray()
                    continue
                _out(_RAW_BANNER + b">")
                data = bytearray()
            elif c == 2:  # Ctrl-B: friendly REPL
                _out(b"\n")
                return _TO_FRIENDLY
            elif c == 3:  # Ctrl-C: clear the line
                data = bytearray()
            elif c == 4:  # Ctrl-D: run
                break
            else:
                data.append(c)
        _out(b"OK")
        if not data:
            _out(b"\n")
            return _EXIT_SOFT_RAW
        r = execute(bytes(data), g, "exec", True, _EXIT_SOFT_RAW)
        if r:
            return r


def read_line(line, prompt, indent=""):
    """One edited line at the friendly prompt: (text, 0) or ("", control character).
    indent: auto-indentation already typed for the user, as a board's REPL does."""
    _out(prompt + indent.encode())
    text = bytearray(indent.encode())
    while True:
        c = line.byte()
        if c in (13, 10):
            _out(b"\n")
            return text.decode(), 0
        if c == 3:
            return "", 3
        if c in (1, 2, 4, 5):
            if not text.strip():
                return "", c
        elif c in (8, 127):
            if text:
                text = text[:-1]
                _out(b"\x08 \x08")
        elif c == 27:  # escape sequence (arrow keys): skipped
            line.byte()
            line.byte()
        elif c >= 32:
            text.append(c)
            _out(bytes([c]))


def _paste_mode(line):
    _out(b"\npaste mode; Ctrl-C to cancel, Ctrl-D to finish\n=== ")
    data = bytearray()
    while True:
        c = line.byte()
        if c == 3:
            _out(b"\n")
            return None
        if c == 4:
            _out(b"\n")
            return bytes(data)
        data.append(c)
        _out(b"\n=== " if c == 13 else bytes([c]))


def friendly_repl(line, g, banner):
    _out(banner)
    while True:
        text, ctrl = read_line(line, b">>> ")
        if ctrl == 1:
            _out(b"\n")
            return _TO_RAW
        if ctrl == 2:
            _out(b"\n" + banner)
            continue
        if ctrl == 3:
            _out(b"\n")
            continue
        if ctrl == 4:
            _out(b"\n")
            return _EXIT_SOFT_FRIENDLY
        if ctrl == 5:
            src = _paste_mode(line)
            r = execute(src, g, "exec", False, _EXIT_SOFT_FRIENDLY) if src else 0
            if r:
                return r
            continue
        if not text.strip():
            continue
        if text.rstrip().endswith(":") or text.startswith("@"):
            last = text
            while True:  # a compound statement ends at an empty line
                indent = last[:len(last) - len(last.lstrip())]
                if last.rstrip().endswith(":"):
                    indent += "    "
                more, ctrl = read_line(line, b"... ", indent)
                if ctrl == 3:
                    text = ""
                    _out(b"\n")
                    break
                if ctrl == 4 or not more.strip():
                    break
                text += "\n" + more
                last = more
            if not text:
                continue
        r = execute(text, g, "single", False, _EXIT_SOFT_FRIENDLY)
        if r:
            return r


def _run_file(name, g, soft):
    """boot.py / main.py, as a board runs them after a reset. 0 or a reset exit code."""
    try:
        with open(name) as f:
            src = f.read()
    except OSError:
        return 0
    return execute(src, g, "exec", False, soft)


class _BoardOs:
    """The os module as a board's: ilistdir entries carry the file size (the unix port
    leaves it out, and `mpremote fs ls` shows it)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def ilistdir(self, path=""):
        real = self._real
        prefix = "" if path in ("", ".") else path.rstrip("/") + "/"
        for entry in real.ilistdir(path or "."):
            size = 0
            if entry[1] == 0x8000:
                try:
                    size = real.stat(prefix + entry[0])[6]
                except OSError:
                    pass
            yield (entry[0], entry[1], entry[2], size)


def _corrupting_open(targets):
    """An open() whose writes to the named files flip one bit: a failing flash chip."""
    real_open = open

    class Corrupting:
        def __init__(self, f):
            self.f = f
            self.first = True

        def write(self, data):
            if self.first and len(data):
                self.first = False
                data = bytearray(data)
                data[len(data) // 2] ^= 0x01
            return self.f.write(data)

        def close(self):
            self.f.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def corrupting_open(path, mode="r", *args):
        f = real_open(path, mode, *args)
        if path.lstrip("/") in targets and ("w" in mode or "a" in mode):
            return Corrupting(f)
        return f

    return corrupting_open


def main():
    opts = json.loads(sys.argv[1])
    # A board's module path: its flash, frozen modules, /lib; then the virtual board's
    # `machine`, which stands in for the board's built-in one.
    sys.path[:] = ["", ".frozen", "lib", opts["vboard"]]
    sys.modules["os"] = _BoardOs(os)
    if opts.get("uart_paths"):
        import machine

        for uart_id, path in opts["uart_paths"].items():
            machine.board.uart_paths[int(uart_id)] = path
    v = sys.implementation.version
    banner = ("MicroPython v%d.%d.%d on vdevice; evedge virtual device with unix port\n"
              'Type "help()" for more information.\n' % (v[0], v[1], v[2])).encode()
    line = Line()
    g = {"__name__": "__main__"}
    if opts.get("corrupt"):
        g["open"] = _corrupting_open(opts["corrupt"])
    mode = opts["mode"]
    soft = _EXIT_SOFT_RAW if mode == "raw" else _EXIT_SOFT_FRIENDLY
    if opts["boot"] == "soft":
        _out(b"MPY: soft reboot\n")
    r = _run_file("boot.py", g, soft)
    if not r and mode == "friendly" and opts.get("run_main"):
        r = _run_file("main.py", g, soft)
    while not r:
        try:
            if mode == "raw":
                r = raw_repl(line, g, opts.get("raw_paste", True))
            else:
                r = friendly_repl(line, g, banner)
        except KeyboardInterrupt:
            r = 0  # a Ctrl-C that landed in the REPL itself: start its prompt again
            _out(b"\n")
        if r == _TO_FRIENDLY:
            mode, r = "friendly", 0
        elif r == _TO_RAW:
            mode, r = "raw", 0
    _state("reset %d" % r)
    sys.exit(r)


main()
