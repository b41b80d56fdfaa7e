# The two record slots of the energy store, as two small files on the board's flash
# filesystem. The store only needs read(slot) and write(slot, data); tests swap in a flash
# that stops writing after N bytes, leaving the partial bytes behind, as a power cut does.
# Whatever the filesystem does on a cut (littlefs keeps the old file, FAT may keep a
# truncated one), the store's CRC and sequence number pick the good slot.
import os


class FileFlash:
    """Slot 0 -> path_a, slot 1 -> path_b. Errors from the filesystem propagate as OSError."""

    def __init__(self, path_a, path_b):
        self.paths = (path_a, path_b)

    def read(self, slot):
        """The slot's bytes, or None if the file does not exist or cannot be read."""
        try:
            f = open(self.paths[slot], "rb")
        except OSError:
            return None
        try:
            return f.read()
        except OSError:
            return None
        finally:
            f.close()

    def write(self, slot, data):
        """Replace the slot's content with data and push it to the medium."""
        f = open(self.paths[slot], "wb")
        fsync = getattr(os, "fsync", None)  # CPython: sync this file only
        try:
            f.write(data)
            f.flush()
            if fsync is not None:
                fsync(f.fileno())
        finally:
            f.close()
        if fsync is None:
            sync = getattr(os, "sync", None)  # MicroPython boards: sync the filesystem
            if sync is not None:
                sync()
