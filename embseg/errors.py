"""Errors that the command line reports as one clear line (exit code 2)."""

from __future__ import annotations


class EmbsegError(Exception):
    """A fatal, user-facing problem: the message names the file and the item at fault.

    The CLI prints it as a single line ``embseg: error: <message>`` and exits with code 2,
    never with a traceback. Library code raises it for bad input that stops the whole job
    (missing file, malformed annotation file, unknown category, ...).
    """

    exit_code = 2


class ItemFailure(Exception):
    """A per-item problem (one image, one sample) that is recorded, not fatal for the job."""
