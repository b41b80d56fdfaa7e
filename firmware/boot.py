# Runs first at power-up on the board. Kept minimal: everything that can fail lives in
# main.py, where the app reports a broken configuration instead of crashing.
import gc

gc.collect()
