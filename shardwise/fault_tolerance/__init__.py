"""Fault tolerance (docs/fault_tolerance.md): erasure-coded in-memory snapshots held by per-node snapshot managers.

Modules (imported explicitly; this package imports nothing so the snapshot manager starts without torch):

* ``config``     FaultToleranceConfig (Hydra group ``fault_tolerance``) and ``validate_ft``
* ``erasure``    systematic Cauchy Reed-Solomon over GF(2^8) (XOR when m = 1), numpy-vectorised
* ``shm_store``  per-rank double-buffered slots in /dev/shm with an atomic commit record
* ``smp`` / ``smp_client``  the per-node snapshot manager process and its authenticated TCP client
* ``snapshot``   trainer-side asynchronous SnapshotEngine, restore helpers
* ``recovery``   EC grouping across nodes, newest restorable step, rebuild of lost members
* ``inject``     fault injection (``FaultToleranceConfig.inject``) for tests and demos

See docs/fault_tolerance.md for the trainer/launcher integration.
"""
