# Runs one firmware test function inside an interpreter subprocess (MicroPython leg).
# Usage: mpy_runner.py MODULE FUNCTION. Exit 0 and print the pass marker on success;
# print the interpreter's own traceback and exit 1 on failure.
import sys

_PASS = "@@FWTEST-PASS"


def _main():
    module_name = sys.argv[1]
    function_name = sys.argv[2]
    module = __import__(module_name)
    function = getattr(module, function_name)
    try:
        function()
    except BaseException as exc:  # report everything, including SystemExit from the test
        if hasattr(sys, "print_exception"):
            sys.print_exception(exc)
        else:
            import traceback
            traceback.print_exc()
        sys.exit(1)
    print(_PASS)


_main()
