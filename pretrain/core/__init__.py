"""The bottom layer: errors and exit codes, the process group, atomic files, the checkpoint format and
reading weights."""
