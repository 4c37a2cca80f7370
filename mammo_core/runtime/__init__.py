"""Process-level safety: isolation of untrusted work, stop requests, process lifetime, faults.

Modules:
- ``faults``: Fault injection points, so that tests can kill or fail a run at a named place.
- ``intra_op_threads``: Run a block of torch work with a given number of intra-op threads, then restore the count.
- ``isolation``: Run one function over many items in worker processes, so that one item cannot take the others down.
- ``openmp_wait``: How torch's OpenMP threads wait between parallel regions: the default, and what reports name.
- ``process_lifetime``: Child processes that end with their parent, even when the parent is killed with SIGKILL.
- ``stop_request``: One process-wide stop request: set when the user interrupts a run, read by long loops between steps.
"""
