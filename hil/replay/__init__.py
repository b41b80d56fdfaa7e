"""Replay recorded traces against columns under test and judge the result with oracles."""
