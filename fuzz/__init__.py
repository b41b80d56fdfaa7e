"""Fuzzing campaign (`python -m fuzz`, `make fuzz`): cheap mutation fuzzing of every parser
and validator that takes input from outside, seeded with valid inputs made by the project's
own encoders. Kept importable by MicroPython (fuzz/fw/ runs on it): no code here.
"""
