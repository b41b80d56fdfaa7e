"""Real parts for tests, the demo and the HIL: broker processes, serial line pairs, ports.

Everything here starts real processes or real kernel objects and knows how to stop them;
nothing is mocked.
"""
